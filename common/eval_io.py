"""Files evaluate.py reads and writes that are not its science: the sample cache, checkpoint weights streamed from
safetensors, and the results (JSON, results.md, plots).

Generation cache (generations/<ckpt>/<bench>__<settings>.jsonl, one JSON row per problem, appended as graded)
    fingerprint(path)                    identity of a checkpoint's weights, stored in the cache's .meta.json
    read_cache(path, repair)             {problem id: row}; a line cut short by a kill is dropped (and cut off)

Checkpoint weights, one tensor at a time (two 8B state dicts never in memory together)
    Weights(path), Delta(a, b)           read-only Mappings name -> tensor: theta, and theta_b - theta_a
    layer_of(name), sq_norm(t)           parameter name -> "embed" / "layer_i" / "final_norm" / ...; ||t||^2 in float64

Results in --out
    clean_json(value), dump(obj, path)   JSON without NaN (-> null) or "_private" keys, written atomically
    write_markdown(out)                  results.md, rebuilt from every results/*.json, arms__, compare__ and
                                         displacement__*.json and plots/*.png in out (fmt, accuracy_table)
    plot_comparison(res, stem)           PNGs, matplotlib on the Agg backend (run curves: common/curves.py)

Why here and not in evaluate.py: none of it decides what is measured; it is storage, formatting and drawing that
STYLE.md keeps out of the stage scripts (so evaluate.py reads as its analyses), and the cache and weight readers are
generic over checkpoints (any script comparing two checkpoints' weights can use Weights and Delta). The markdown
tables follow the JSON schemas evaluate.py writes; its docstring documents every metric.
"""
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np
import torch

from common.dist import print0
from common.runlog import read_metrics
from common.stats import param_delta

# ============================================================================= generation cache

FINGERPRINT_WHOLE_BYTES = 256 << 20     # a safetensors file up to this size is hashed whole, a larger one sampled


def fingerprint(path: str) -> str:
    """Identity of a checkpoint's weights: a hash of every safetensors file (whole up to FINGERPRINT_WHOLE_BYTES,
    else its size and 64 evenly spaced 64 KB blocks: a training step, which moves every weight, changes them; a
    change confined to a few tensors may fall between the blocks). A cache written by other weights under the same
    label is refused."""
    h = hashlib.sha1()
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        size = os.path.getsize(f)
        h.update(f"{os.path.basename(f)}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= FINGERPRINT_WHOLE_BYTES:
                h.update(fh.read())
                continue
            for i in range(64):
                fh.seek((size - 65536) * i // 63)
                h.update(fh.read(65536))
    return h.hexdigest()[:16]


def read_cache(path: str, repair: bool = False) -> dict[str, dict]:
    """{problem id: row} of a cache file; a last line without its newline (killed mid-write) is ignored, and with
    repair=True cut off, so that the next append starts on a fresh line."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print0(f"[evaluate] {path}: ignoring a truncated last line ({len(data) - end} bytes)")
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
    rows = {}
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
            rows[row["id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            print0(f"[evaluate] {path}: skipping a corrupt line")
    return rows


# ============================================================================= checkpoint weights

class Weights(Mapping):
    """A checkpoint's floating-point tensors by name, read from its safetensors one tensor at a time (two 8B
    state dicts are never in memory together)."""

    def __init__(self, path: str):
        from safetensors import safe_open
        self.where = {}
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise SystemExit(f"{path}: no *.safetensors files")
        for f in files:
            with safe_open(f, "pt") as h:
                self.where |= {k: f for k in h.keys() if h.get_slice(k).get_dtype() in ("F64", "F32", "F16", "BF16")}

    def __getitem__(self, name):
        from safetensors import safe_open
        with safe_open(self.where[name], "pt") as h:
            return h.get_tensor(name)

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)

    def __contains__(self, name):
        return name in self.where


class Delta(Mapping):
    """theta_b - theta_a by name, computed when read (stats.param_delta, one tensor at a time)."""

    def __init__(self, a: Weights, b: Weights):
        self.a, self.b = a, b
        self.names = [n for n in b if n in a]

    def __getitem__(self, name):
        return param_delta({name: self.a[name]}, {name: self.b[name]})[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __contains__(self, name):
        return name in self.b and name in self.a


def layer_of(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name)
    if m:
        return f"layer_{int(m.group(1)) + 1}"
    return ("embed" if "embed_tokens" in name else "lm_head" if "lm_head" in name
            else "final_norm" if name.endswith("norm.weight") else "other")


def sq_norm(t: torch.Tensor) -> float:
    t = t.reshape(-1)
    return sum(float(t[s:s + (1 << 24)].double().square().sum()) for s in range(0, t.numel(), 1 << 24))


# ============================================================================= results: JSON, tables, plots

def fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def accuracy_table(results: list[dict]) -> list[str]:
    k = results[0]["k"]
    cols = [c for c in results[0]["macro"] if c not in ("n_problems", "k")]
    lines = ["| checkpoint | benchmark | " + " | ".join(cols) + " | n |", "|" + "---|" * (len(cols) + 3)]
    for r in results:
        for bench, m in list(r["benchmarks"].items()) + [("macro avg", r["macro"])]:
            lines.append(f"| {r['label']} | {bench} | " + " | ".join(fmt(m.get(c)) for c in cols)
                         + f" | {m.get('n_problems', '')} |")
    return [f"k = {k}; len in tokens; trunc, no_ans: fractions of samples.", ""] + lines


def write_markdown(out: str):
    md = ["# Evaluation results", "", "Rebuilt from the JSON files in this directory by evaluate.py; metrics are "
          "documented in evaluate.py's docstring.", ""]
    by_tag = {}
    for f in sorted(glob.glob(os.path.join(out, "results", "*.json"))):
        r = json.load(open(f))
        by_tag.setdefault(r["settings"], []).append(r)
    for tag, results in by_tag.items():
        md += [f"## Accuracy ({tag})", ""] + accuracy_table(results) + [""]
    for f in sorted(glob.glob(os.path.join(out, "arms__*.json"))):
        r = json.load(open(f))
        md += [f"## Seeds ({r['settings']})", "", f"mean [95% CI] over seeds of {r['metric']}.", "",
               "| arm | seeds | " + " | ".join(r["benchmarks"]) + " |", "|" + "---|" * (len(r["benchmarks"]) + 2)]
        for arm, per in r["arms"].items():
            md.append(f"| {arm} | {per['n_seeds']} | " + " | ".join(
                f"{fmt(per[b]['mean'])} [{fmt(per[b]['lo'])}, {fmt(per[b]['hi'])}]" for b in r["benchmarks"]) + " |")
        md += ["", "A - B in per-problem accuracy, three ways. Problems only: paired bootstrap over problems of the "
               "accuracy averaged over each arm's seeds (blind to training-seed variance). Seeds + problems: two-level "
               "bootstrap, each arm's seeds, then the problems. Paired t: per-seed differences, the i-th checkpoints "
               "of the two arms paired (equal seed counts only).", "",
               "| A - B | benchmark | diff | 95% CI, problems only | p | 95% CI, seeds + problems | p | "
               "95% CI, paired t | p |", "|" + "---|" * 9]

        def ci(t):
            return f"[{fmt(t['ci'][0])}, {fmt(t['ci'][1])}]" if t else "-"
        for t in r["tests"]:
            sb, pt = t.get("seed_bootstrap") or {}, t.get("seed_paired_t") or {}
            md.append(f"| {t['a']} - {t['b']} | {t['benchmark']} | {fmt(t['diff'])} | {ci(t)} | {fmt(t['p_value'], 4)} | "
                      f"{ci(sb)} | {fmt(sb.get('p_value'), 4)} | {ci(pt)} | {fmt(pt.get('p_value'), 4)} |")
        md.append("")
    for f in sorted(glob.glob(os.path.join(out, "compare__*.json"))):
        r = json.load(open(f))
        et, sh, dv = r["effective_temperature"], r["sharpness"], r["diversity"]
        md += [f"## Comparison: {r['other']} vs {r['base']} (BASE)", "",
               f"{r['n_tokens']} response positions of {r['n_sequences']} BASE samples; diversity over {r['n_prompts']} "
               f"prompts x {dv['base']['n']} samples per model ({r['settings']}).", "",
               "| | BASE | OTHER |", "|---|---|---|",
               f"| entropy at T=1 (nats) | {fmt(r['entropy']['base'])} | {fmt(r['entropy']['other'])} |",
               f"| max prob | {fmt(sh['base']['max_prob'])} | {fmt(sh['other']['max_prob'])} |",
               f"| logit std | {fmt(sh['base']['logit_std'])} | {fmt(sh['other']['logit_std'])} |"]
        md += [f"| {k.replace('_', ' ')} per group | {fmt(dv['base'][k])} | {fmt(dv['other'][k])} |"
               for k in ("distinct_answers", "distinct_responses", "accuracy", "response_len")]
        pt = et["per_token"]
        bound = " (at the search bound)" if et["tau_at_bound"] else ""
        md += ["", f"tau* = {fmt(et['tau'], 4)}{bound} (KL at tau*: {fmt(et['kl'], 5)}, at 1: {fmt(et['kl_at_1'], 5)}, "
               f"explained: {fmt(et['explained'])}); per-token tau* p10/p50/p90 = {fmt(pt.get('p10'))} / "
               f"{fmt(pt.get('p50'))} / {fmt(pt.get('p90'))}.",
               "top-k overlap: " + ", ".join(f"k={k}: {fmt(v)}" for k, v in r["topk_overlap"].items()) + ".",
               f"||theta_OTHER - theta_BASE|| = {fmt(r['displacement']['delta_norm'], 4)} "
               f"({fmt(r['displacement']['relative'], 5)} of ||theta_BASE||).", "",
               "| layer | cosine | CKA | ||Delta|| | relative |", "|---|---|---|---|---|"]
        disp = {d["name"]: d for d in r["displacement"]["per_layer"]}
        for layer in r["layers"]:
            d = disp.get(layer["name"], {})
            md.append(f"| {layer['name']} | {fmt(layer['cosine'], 5)} | {fmt(layer['cka'], 5)} | "
                      f"{fmt(d.get('delta_norm'), 4)} | {fmt(d.get('relative'), 5)} |")
        md.append("")
    for f in sorted(glob.glob(os.path.join(out, "displacement__*.json"))):
        r = json.load(open(f))
        md += [f"## Displacement: LOW {r['low']}, HIGH {r['high']}, from {r['base']}", "",
               f"cosine(Delta_low, -Delta_high) = {fmt(r['cosine'], 4)} (so cos(Delta_low, Delta_high) = "
               f"{fmt(r['cos_low_high'], 4)}; paper, Qwen3-8B: -0.878 for the latter); reverse coefficient = "
               f"{fmt(r['reverse_coef'], 4)} (paper: 0.891); ||Delta_low|| / ||Delta_high|| = {fmt(r['norm_ratio'], 4)}.",
               "", "| layer | ||Delta_low|| | ||Delta_high|| | cos(low, -high) |", "|---|---|---|---|"]
        md += [f"| {d['name']} | {fmt(d['low_norm'], 4)} | {fmt(d['high_norm'], 4)} | {fmt(d['cosine'], 4)} |"
               for d in r["per_layer"]]
        md.append("")
    plots = sorted(glob.glob(os.path.join(out, "plots", "*.png")))
    if plots:
        md += ["## Plots", ""] + [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_comparison(res: dict, stem: str) -> list[str]:
    plt = pyplot()
    from matplotlib import ticker
    ent, tau = res["_plots"]["entropy"], res["_plots"]["tau"]
    fig, ax = plt.subplots(figsize=(6, 4))
    hi = max(float(ent["base"].max()), float(ent["other"].max()), 1e-3)
    for k, label in (("base", res["base"]), ("other", res["other"])):
        ax.hist(ent[k].double().numpy(), bins=60, range=(0, hi), alpha=0.5, label=f"{label} (mean {ent[k].mean():.3f})")
    ax.set_yscale("log")
    ax.set(xlabel="next-token entropy at T=1 (nats)", ylabel="tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "_entropy.png", dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    t = tau[~tau.isnan()].double().numpy()
    if t.size:                                  # log-spaced bins: tau spans 0.05 .. 20
        lo, hi = max(t.min(), 0.05) / 1.05, min(t.max(), 20) * 1.05
        ax1.hist(t, bins=np.geomspace(lo, hi, 60))
        ax1.set_xscale("log")
        ax1.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax1.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax1.axvline(res["effective_temperature"]["tau"], color="k", linestyle="--", label="global tau*")
    ax1.set(xlabel="per-token tau*", ylabel="tokens")
    ax1.legend(fontsize=8)
    curve = res["effective_temperature"]["kl_curve"]
    ax2.plot([float(x) for x in curve], list(curve.values()), marker="o")
    ax2.set(xlabel="tau", ylabel="mean KL(OTHER || softmax(BASE / tau))")
    fig.tight_layout()
    fig.savefig(stem + "_tau.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(res["layers"]))
    for key in ("cosine", "cka"):
        ax.plot(xs, [layer[key] for layer in res["layers"]], marker="o", label=key)
    ax.set_xticks(list(xs), [layer["name"] for layer in res["layers"]], rotation=90, fontsize=6)
    ax.set(ylabel="similarity, OTHER vs BASE", title=f"{res['other']} vs {res['base']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + "_layers.png", dpi=120)
    plt.close(fig)
    return [stem + s for s in ("_entropy.png", "_tau.png", "_layers.png")]


def clean_json(value):
    """NaN/inf -> null (an undefined CI, a ratio of zeros); tensors and tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dump(obj, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(clean_json(obj), f, indent=1)
    os.replace(path + ".tmp", path)
