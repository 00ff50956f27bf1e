"""bench/gpu/check.sh's summary: what its parts wrote, as tables, and summary.json with the verdicts.

    python bench/gpu/summary.py OUT WORK      # OUT: what comes back; WORK: the runs' scratch (evaluate's outputs)

- rl / reheat: the first and last step of the main metrics (metrics.jsonl in OUT/rl, OUT/reheat)
- weight sync: rollout/logprob_diff_mean and _max of every rl_dapo step, flagged above common/runlog.py's threshold
  (the sampler's log-probs of its own samples against the trainer's, after the engine slept through the update and
  took the new weights: far above bf16's ~0.01-0.02 means it samples from other weights or another law)
- memory: bench/gpu/peak_memory.py's table (OUT/memory_gpu.json), and per script whether activation checkpointing
  recomputed every layer forward of the model the script built (counted) and what its preflight measured
- evaluate: macro accuracy of each checkpoint of the multi-checkpoint run (WORK/eval), and whether the last one's
  samples equal those of its own 1-checkpoint run (WORK/eval_one): the engine that served the others first must
  not change them
- the KL and rollout benchmarks' tables
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from common.eval_io import read_cache  # noqa: E402
from common.runlog import LOGPROB_WARN_NATS  # noqa: E402

KEYS = ("rollout/accuracy", "train/entropy_t1", "train/entropy", "rollout/logprob_diff_mean",
        "rollout/logprob_diff_max", "reheat/student_entropy", "reheat/divergence", "time/step", "time/rollout",
        "time/update", "time/weight_sync",
        "perf/rollout_tokens_per_s", "val/accuracy")


def metrics(out: str, run: str) -> list[dict]:
    path = os.path.join(out, run, "metrics.jsonl")
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def runs(out: str):
    for run in ("rl", "reheat"):
        rows = metrics(out, run)
        if not rows:
            print(f"{run}: no metrics")
            continue
        print(f"{run}: {len(rows)} steps")
        for k in (k for k in KEYS if k in rows[-1]):
            print(f"  {k:32s} first {rows[0].get(k, float('nan')):10.4g}   last {rows[-1][k]:10.4g}")


def weight_sync(out: str) -> dict:
    rows = [r for r in metrics(out, "rl") if "rollout/logprob_diff_mean" in r]   # steps without an update have none
    print(f"weight sync (rl_dapo): sampler vs trainer log-prob of the sampled tokens, nats; flag > {LOGPROB_WARN_NATS}")
    for r in rows:
        flag = "  <-- OVER" if r["rollout/logprob_diff_mean"] > LOGPROB_WARN_NATS else ""
        print(f"  step {r['step']:3d}  mean {r['rollout/logprob_diff_mean']:<10.3g}  "
              f"max {r['rollout/logprob_diff_max']:.3g}{flag}")
    over = [r["step"] for r in rows if r["rollout/logprob_diff_mean"] > LOGPROB_WARN_NATS]
    print(f"  {'no step' if not over else f'steps {over}'} over the threshold" if rows else "  no update steps")
    return {"threshold": LOGPROB_WARN_NATS, "steps_over": over,
            "per_step": [{k: r[k] for k in ("step", "rollout/logprob_diff_mean", "rollout/logprob_diff_max")}
                         for r in rows]}


def first_contact(measured: list[dict]) -> list[dict]:
    """Per script: did activation checkpointing recompute every layer forward (counted), and the preflight's
    measured peak before vLLM started."""
    rows = []
    for m in measured:
        ac, pf = m.get("ac_counts", {}), m.get("preflight") or {"ran": False}
        rows.append({"script": m["script"], "activation_checkpointing": m["activation_checkpointing"],
                     "grad_forwards": ac.get("grad_forwards"), "recomputed": ac.get("recomputed"),
                     "ac_ok": m.get("ac_ok"), "preflight": pf})
        peak = f"peak {pf['peak_gib']:.2f} GiB, {pf['free_gib']:.1f} GiB free after" if "peak_gib" in pf else \
            ("ran (no CUDA: not measured)" if pf.get("ran") else "did not run")
        print(f"{m['script']}: activation checkpointing {'on' if m['activation_checkpointing'] else 'off'}, "
              f"{ac.get('grad_forwards')} layer forwards with grad, {ac.get('recomputed')} recomputed: "
              f"{'OK' if m.get('ac_ok') else 'FAIL  <-- CHECK'}; preflight {peak}")
    return rows


def evaluate(work: str) -> dict:
    res, engines = {}, set()
    for path in sorted(glob.glob(os.path.join(work, "eval", "results", "*.json"))):
        r = json.load(open(path))
        res[r["label"]] = {k: v for k, v in r["macro"].items() if not k.startswith("pass@") or k == f"pass@{r['k']}"}
        engines.add(r["engine"])
    if not res:
        print("evaluate: no results")
        return {}
    print(f"evaluate, {len(res)} checkpoints in one process, engine {'/'.join(sorted(engines))} "
          f"({'one engine, weights loaded in place' if engines == {'vllm'} else 'a new model for each'}; "
          f"macro over benchmarks):")
    for label, m in res.items():
        print(f"  {label:8s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float)))
    # the last checkpoint of the multi-checkpoint run against its own run, sample by sample
    alone = sorted(glob.glob(os.path.join(work, "eval_one", "generations", "*", "*.jsonl")))
    same = bool(alone)
    for path in alone:
        label, name = path.split(os.sep)[-2:]
        mine = read_cache(os.path.join(work, "eval", "generations", label, name))
        theirs = read_cache(path)
        key = lambda row: [(s["text"], s["correct"]) for s in row["samples"]]  # noqa: E731
        eq = theirs.keys() == mine.keys() and all(key(theirs[i]) == key(mine[i]) for i in theirs)
        same &= eq
        print(f"  {label} / {name.split('__')[0]}: {'the same samples as' if eq else 'OTHER samples than'} its own "
              f"1-checkpoint run{'' if eq else '  <-- CHECK'}")
    return {"engine": sorted(engines), "macro": res, "last_equals_alone": same if alone else None}


def benchmarks(out: str):
    for name in ("kl_gpu.json", "rollout_gpu.json"):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            print(f"{name}: none")
            continue
        data = json.load(open(path))
        if "table" in data:
            print(data["table"])
        for r in data.get("rows", []):
            print(f"rollout {r['engine']}: {r['tokens_per_s']:.0f} tok/s, start-up {r['startup_s']:.1f} s, "
                  f"sync {r['sync_s']:.4f} s = {r['sync_share_of_step']:.1%} of a generate+sync step")


def main():
    out, work = sys.argv[1:3]
    runs(out)
    summary = {"weight_sync": weight_sync(out)}
    mem = os.path.join(out, "memory_gpu.json")
    if os.path.exists(mem):
        from peak_memory import print_table
        data = json.load(open(mem))
        summary["memory"] = data["rows"]
        print_table(summary["memory"])
        summary["first_contact"] = first_contact(data["measured"])
    else:
        print("memory: no estimate (see the log)")
    summary["evaluate"] = evaluate(work)
    benchmarks(out)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
