"""Evaluate policies: benchmark accuracy, seeds and significance, and what a reheat changed (TS-OPSD analyses).

Any combination of four jobs in one call, all writing into `--out` (results.md is rebuilt from every JSON there):

1. Accuracy (`--ckpt`, `--arms`). Each checkpoint samples k responses per problem of every benchmark (vLLM by
   default, `--rollout-engine hf` otherwise; one vLLM engine per process serves every checkpoint, each one's
   weights loaded in place), graded by common/grading.py. Under torchrun rank r samples problems
   r, r+W, ... of the to-do list and rank 0 gathers and writes them. Every problem has its own sampling seed,
   derive_seed(--seed, crc32(benchmark), crc32(problem id)), so its samples depend neither on the number of ranks
   nor on what else is in the batch (vLLM: one seed per request; HF: one random stream per sampled row). Samples are
   cached per (checkpoint, benchmark, sampling settings) as JSONL, one line per problem, appended as they are
   graded: a rerun skips problems already cached (a line cut short by a kill is dropped) and regenerates nothing.
2. Seeds (`--arms name=ckptA,ckptB,ckptC other=...`): one checkpoint per training seed. Per benchmark, mean and
   95% t-interval over seeds (stats.mean_ci); between every two arms three tests of the difference: a paired
   bootstrap over problems of the per-problem accuracy averaged over the arm's seeds (stats.paired_bootstrap:
   problem sampling only), a two-level bootstrap over seeds and then problems (stats.hierarchical_bootstrap), and,
   when the arms have the same number of seeds, a paired t-test on the per-seed differences, the i-th checkpoints
   of the two arms taken as one seed (stats.paired_seed_t).
3. Comparison (`--compare BASE OTHER`, e.g. collapsed vs reheated). Diversity: both models sample
   `--compare-n` responses to the same `--compare-problems` prompts. Then BASE's first sample of every prompt is
   scored by BOTH models with the HF forward in float32 (also on a GPU, where HF generation runs in bf16), at
   `--analysis-tokens` response positions drawn uniformly (seeded) from all of them; logits are made from the final
   hidden states a row chunk at a time (LogitsFromHidden), so [tokens x vocab] never exists at once. On those
   positions: entropy and sharpness of each model, the effective temperature tau*, top-k overlap, per-layer
   hidden-state cosine and linear CKA; and, from the weights, the per-layer parameter displacement.
   `--displacement BASE LOW HIGH`: is a low-temperature distillation (tau < 1) the reverse of the reheat (tau > 1)?
   The paper reports, on Qwen3-8B, a cosine of -0.878 "between Delta_low and -Delta_high" and a reverse projection
   coefficient of +0.891; those two signs cannot both hold for one pair of vectors (see common/stats.py:
   displacement_metrics), so compare the paper's -0.878 with our `cos_low_high` (= -cosine).
4. Runs (`--runs DIR ...`): PNG curves of entropy, accuracy, uniform groups and response length from
   metrics.jsonl, and one summary figure; a run started from another listed run's checkpoint continues its
   x-axis, and label_s0, label_s1, ... are drawn as one mean with a band (common/curves.py).

Sampling defaults: temperature 1.0, top-p 1.0 (the distribution the policy was trained and reheated at: the
objects compared are policies at T=1, and a reheated model IS approximately the collapsed one at T=tau; evaluating
at 0.6 would re-sharpen both and hide what reheating changed; `--temperature 1.5` on the collapsed model is the
"reheat at sampling time" baseline), 20480 max tokens (rl_dapo.py's training length: shorter would cut correct
long solutions), k = 16. Temperature is applied to the final logits only, by the sampler; the analyses score
at T=1, so a reheated checkpoint's temperature is whatever its weights put there (the paper's public review asked where the temperature is applied).

    python evaluate.py --ckpt assets/tiny_math/model --benchmarks test=assets/tiny_math/data/test.jsonl --prompt-style plain \
        --k 4 --max-tokens 64 --out runs/eval_tiny
    torchrun --nproc_per_node=8 evaluate.py --ckpt collapsed=runs/rl/final reheated=runs/reheat/final --out runs/eval
    python evaluate.py --compare runs/rl/final runs/reheat/final --out runs/eval
    python evaluate.py --displacement runs/rl/final runs/sharpen_tau0.67/final runs/reheat_tau1.5/final --out runs/eval
    python evaluate.py --arms dapo=runs/d0/final,runs/d1/final,runs/d2/final tsopsd=runs/t0/final,runs/t1/final,runs/t2/final
    python evaluate.py --runs collapsed=runs/rl_dapo__0__20261126-120000 reheat=runs/reheat_tsopsd__0__20261127-090000

Outputs in --out:
    results.md                             every table below, rebuilt from the JSONs in --out
    results/<ckpt>__<settings>.json        accuracy per benchmark + macro average + per-problem accuracy
    arms__<settings>.json                  mean [95% CI] over seeds; tests between arms: problem-only bootstrap
                                           (top level), "seed_bootstrap", "seed_paired_t" (null: unequal seeds)
    compare__<base>__vs__<other>.json      the comparison; displacement__<base>__<low>__<high>.json
    generations/<ckpt>/<bench>__<settings>.jsonl   the sample cache: {"id", "samples": [{"text", "answer",
                                           "correct", "length", "finish_reason"(, "ids")}]}, + .meta.json
    plots/runs_{entropy,entropy_trained,accuracy,uniform_groups,response_len,summary}.png (common/curves.py:
                                           branches continue their parent's steps; seeds: mean + band),
    plots/compare__<b>__vs__<o>_{entropy,tau,layers}.png
    config.json, env.json, command.txt     what produced them (common/runlog.py)
The cache, the streamed safetensors reads, the JSON, results.md and the plots are in common/eval_io.py.

Metrics (README text):
    Accuracy, per benchmark and macro-averaged over benchmarks (each benchmark weighs the same):
    avg@k           mean correctness of the k samples, averaged over problems: expected single-sample accuracy
    pass@j          unbiased pass@j (Chen et al. 2021) for j = 1, 2, 4, ..., k: chance that at least one of j
                    samples is right; the gap pass@k - pass@1 is the headroom that diversity gives RL
    maj@k           majority vote over the k extracted answers (string-normalised), then graded
    distinct@k      distinct final answers among the k samples (1: collapsed to one answer; high and low
                    accuracy: guessing)
    len             mean response length in tokens; trunc: fraction of responses cut at --max-tokens (graded
                    as they are, usually wrong); no_ans: fraction with no extractable final answer
    ent_t1          (--entropy-samples N) mean next-token entropy at T=1 (nats) of the checkpoint over the
                    response tokens of its own first N samples per problem: how collapsed the policy is where
                    it actually goes (a collapsed and a start model each on their own samples)
    Seeds: `mean [lo, hi]` is the mean over seeds with a 95% Student-t interval (empty with one seed);
    bootstrap `diff` = mean over problems of (arm A - arm B) per-problem accuracy, its 95% percentile interval and
    two-sided p-value (10000 resamples of problems; pairs kept together, so problem difficulty cancels). That
    interval ignores training-seed variance; the seed-aware ones: `seed_bootstrap` (resample each arm's seeds, then
    problems; same diff) and `seed_paired_t` (mean of the per-seed differences, t interval and p on n_seeds - 1
    degrees of freedom; it conditions on the problems). Quote a seed-aware one for a claim about the methods.
    Comparison (positions: a uniform sample of the response tokens of BASE's first sample per prompt; both models
    condition on the same prefixes; every mean is over those positions):
    entropy         mean next-token entropy at T=1 (nats) of each model; the histogram is per token
    max_prob, logit_std   mean top-1 probability and std of the logits over the vocabulary (sharpness: a pure
                    temperature tau divides logit_std by exactly tau)
    tau*            the single temperature with softmax(z_base / tau*) closest (mean KL) to OTHER; 1: no change;
                    > 1: OTHER is BASE made hotter. kl_at_1 = mean KL(OTHER || BASE), the whole change;
                    explained = 1 - KL(tau*) / kl_at_1, the share of it a temperature accounts for (1 for the
                    closed-form reheat). tau per token: quantiles of each token's own tau* (spread: not one
                    temperature)
    top-k overlap   mean |topk(BASE) & topk(OTHER)| / k, k = 1, 5, 10: 1 = the same candidate set (a pure
                    temperature keeps it exactly)
    layers          per layer (embedding output, every decoder layer's output, the final norm's output):
                    mean cosine of the two models' hidden states token by token, and linear CKA over tokens;
                    1 = representation kept (the closed-form reheat scales the final norm's output and nothing
                    else, and both measures ignore a scale)
    diversity       per prompt group of n samples from each model: distinct final answers, distinct responses,
                    accuracy and length: does reheating restore diversity that can be exploited, not only entropy?
    displacement    ||theta_OTHER - theta_BASE|| per layer, absolute and relative to ||theta_BASE||
    --displacement  cosine = cos(Delta_low, -Delta_high) (+1: exact opposites); cos_low_high = -cosine, the
                    quantity the paper's -0.878 must be; reverse_coef = <Delta_low, -Delta_high> / ||Delta_high||^2,
                    c in Delta_low ~ -c Delta_high (paper: 0.891); norm_ratio = ||Delta_low|| / ||Delta_high||
"""
import dataclasses
import gc
import json
import math
import os
import re
import sys
import time
import zlib

import numpy as np
import torch

from common.batching import pack_padding_free
from common.checkpoint import architecture_difference
from common.cli import arg, check_context_length, parse_args
from common.data import BENCHMARKS, LOCAL_EXTENSIONS, PROMPT_STYLES, DataError, load_problems, render_prompt
from common.dist import (all_gather_objects, check_model_path, cleanup_distributed, derive_seed, init_distributed,
                         print0, resolve_model_path)
from common.curves import plot_runs, plot_summary
from common.eval_io import (Delta, Weights, dump, fingerprint, layer_of, plot_comparison, read_cache, sq_norm,
                            write_markdown)
from common.grading import extract_answer, grade_batch, truncated_is_wrong
from common.losses import entropy_from_hidden
from common.rollout import make_engine
from common.runlog import make_run_dir
from common.stats import (LogitsFromHidden, distinct_count, displacement_metrics, effective_temperature,
                          hierarchical_bootstrap, linear_cka, mean_ci, mean_cosine, paired_bootstrap, paired_seed_t,
                          quantiles, sharpness, summarize, topk_overlap)

PAPER_BENCHMARKS = "aime24,aime25,amc23,math500,minerva,olympiadbench,gpqa_diamond"
MULTI_FLAGS = ("--ckpt", "--arms", "--compare", "--displacement", "--runs")   # take several space-separated values
TAU_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
RUN_CURVES = {"entropy": ("rollout/entropy_est", "reheat/student_entropy"),
              "entropy_trained": ("train/entropy_t1",),
              "accuracy": ("rollout/accuracy", "val/accuracy"),
              "uniform_groups": ("rollout/uniform_frac",),
              "response_len": ("rollout/response_len_mean", "val/response_len")}
# plots/runs_summary.png: one panel each; a run draws the first key it has
SUMMARY_PANELS = {"rollout token entropy (log scale)\n-log p of the sampled tokens,\nall groups, at the rollout T":
                  ("rollout/entropy_est", "reheat/student_entropy"),
                  "held-out accuracy\n(validation, --val-n samples\nat --val-temperature)": ("val/accuracy",),
                  "uniform groups\n(all right or all wrong:\nwhat dynamic sampling drops)": ("rollout/uniform_frac",)}


# ----------------------------------------------------------------------------- arguments

@dataclasses.dataclass
class Args:
    # what to evaluate
    ckpt: str = arg("", "checkpoints for accuracy, space-separated; each a HF dir or hub id, optionally label=path",
                    group="what to evaluate")
    benchmarks: str = arg(PAPER_BENCHMARKS, "comma-separated: names from common/data.py, local .jsonl/.json/.parquet "
                          "files, name=path (a local file in a named benchmark's schema) or label=path (any schema)",
                          group="what to evaluate")
    arms: str = arg("", "seeds per method, space-separated: name=ckptA,ckptB,ckptC other=ckptD,ckptE (their "
                    "checkpoints are evaluated for accuracy too; list the seeds in the same order in every arm: "
                    "the paired test over seeds pairs the i-th checkpoints)", group="what to evaluate")
    compare: str = arg("", "BASE OTHER: diversity, entropy, tau*, top-k overlap, layer similarity, displacement of "
                       "OTHER against BASE (e.g. collapsed vs reheated)", group="what to evaluate")
    displacement: str = arg("", "BASE LOW HIGH: is Delta_low = LOW - BASE the reverse of Delta_high = HIGH - BASE?",
                            group="what to evaluate")
    runs: str = arg("", "run directories with metrics.jsonl to plot, space-separated, optionally label=dir",
                    group="what to evaluate")
    max_problems: int = arg(0, "use the first this-many problems of each benchmark (0: all)", group="what to evaluate")
    # sampling
    k: int = arg(16, "samples per problem (avg@k, pass@1..k, maj@k)", group="sampling")
    temperature: float = arg(1.0, "sampling temperature (1.0: the policy as trained and reheated; see docstring)",
                             group="sampling")
    top_p: float = arg(1.0, "nucleus sampling (1.0: off)", group="sampling")
    max_tokens: int = arg(20480, "max tokens per response (rl_dapo.py's training length)", group="sampling")
    prompt_style: str = arg("dapo_chat", "dapo_chat, dapo_raw or plain (see common/data.py: render_prompt)",
                            group="sampling", choices=PROMPT_STYLES)
    seed: int = arg(0, "seed; every problem derives its own sampling seed from it", group="sampling")
    rollout_engine: str = arg("auto", "vllm, hf, or auto (vllm if installed)", group="sampling",
                              choices=("auto", "vllm", "hf"))
    vllm_gpu_memory: float = arg(0.85, "fraction of GPU memory for vLLM (nothing else trains here)", group="sampling")
    vllm_kv_cache_gib: float | None = arg(None, "vLLM KV cache in GiB (overrides --vllm-gpu-memory; for CPU)",
                                          group="sampling")
    vllm_tp: int = arg(1, "vLLM tensor parallel size", group="sampling")
    hf_batch_size: int = arg(64, "sequences per generate call with the HF engine", group="sampling")
    gen_chunk: int = arg(64, "problems per rank between cache writes (what a kill can lose)", group="sampling")
    grade_workers: int | None = arg(None, "grading processes (None: from the core count; 0: inline)", group="sampling")
    grade_timeout: float = arg(5.0, "seconds per graded response before it counts as wrong", group="sampling")
    grade_truncated: bool = arg(False, "grade responses cut at --max-tokens on their text (default: they count as "
                                "wrong, as in training; the truncated fraction is reported either way)", group="sampling")
    # analyses
    compare_data: str = arg("", "benchmarks whose prompts --compare uses (default: --benchmarks)", group="analyses")
    compare_problems: int = arg(64, "prompts for --compare (a seeded sample of the pooled benchmarks)", group="analyses")
    compare_n: int = arg(8, "samples per prompt and model for --compare's diversity", group="analyses")
    analysis_tokens: int = arg(8192, "response positions analysed: a seeded uniform sample over BASE's first "
                               "sample of every --compare prompt (all of them if fewer)", group="analyses")
    entropy_samples: int = arg(0, "also the mean token entropy at T=1 of every --ckpt/--arms checkpoint on its OWN "
                               "samples (column ent_t1): the response tokens of its first N samples per problem, "
                               "scored in float32 (0: off; costs one forward over those tokens per checkpoint, on "
                               "rank 0)", group="analyses")
    micro_batch_tokens: int | None = arg(None, "tokens per padding-free scoring forward, a longer sequence alone "
                                         "(default: 4096 on CUDA; 512 on CPU, where sdpa builds the packed row's mask "
                                         "as a dense [T, T] tensor)", group="analyses")
    chunk_size: int = arg(64, "token rows per logits chunk (each a few [chunk, vocab] float64 buffers)", group="analyses")
    n_boot: int = arg(10000, "bootstrap resamples for the tests between arms", group="analyses")
    # systems and output
    device: str = arg("auto", "cuda, cpu, or auto", group="systems", choices=("auto", "cpu", "cuda"))
    out: str = arg("runs/eval", "output directory (results, caches, plots). Rerunning the same command (after a "
                   "kill, or a SLURM --requeue) continues: the samples cached here are kept and only the missing "
                   "problems are generated (a kill loses at most --gen-chunk problems per rank), then every table "
                   "and plot is rebuilt", group="systems")


@dataclasses.dataclass
class Ckpt:
    label: str
    path: str


def join_multi_flags(argv: list[str]) -> list[str]:
    """`--ckpt A B C` -> `--ckpt "A B C"`: common/cli.py gives every flag one value."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        i += 1
        if out[-1] in MULTI_FLAGS:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            out.append(" ".join(values))
    return out


def ckpt_spec(item: str) -> Ckpt:
    label, sep, path = item.partition("=")
    if not sep or "/" in label:
        path = item
        parts = os.path.normpath(item).split(os.sep)
        generic = parts[-1] in ("final", "model") or parts[-1].startswith("step_")
        label = "_".join(parts[-2:]) if generic and len(parts) > 1 else parts[-1]
    return Ckpt(re.sub(r"[^\w.+-]", "_", label), path)


def benchmark_specs(text: str) -> list[tuple[str, str, str | None]]:
    """[(label, source, path)] for load_problems(source, path=path); unknown names and missing files fail here."""
    specs = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, sep, path = item.partition("=")
        if sep:                                         # a named schema, or a label for a file of any schema
            if not os.path.isfile(path):
                raise SystemExit(f"benchmark file not found: {path}")
            specs.append((name, name, path) if name in BENCHMARKS else (name, path, None))
        elif item in BENCHMARKS:
            specs.append((item, item, None))
        elif os.path.isfile(item) and os.path.splitext(item)[1].lower() in LOCAL_EXTENSIONS:
            specs.append((os.path.splitext(os.path.basename(item))[0], item, None))
        else:
            raise SystemExit(f"unknown benchmark {item!r}: not one of {sorted(BENCHMARKS)}, not a local "
                             f".jsonl/.json/.parquet file, and not name=path")
    if len({s[0] for s in specs}) != len(specs):
        raise SystemExit(f"--benchmarks: two benchmarks share a name ({[s[0] for s in specs]}); use name=path")
    return specs


def check_args(a: Args) -> dict:
    """Everything that can be wrong with the command line, before any compute. Returns the parsed lists."""
    split = lambda text: [s for s in re.split(r"[\s,]+", text) if s]   # noqa: E731
    ckpts = [ckpt_spec(s) for s in split(a.ckpt)]
    arms = {}
    for item in a.arms.split():
        name, sep, paths = item.partition("=")
        if not sep or not name or not paths:
            raise SystemExit(f"--arms: expected name=ckptA,ckptB,..., got {item!r}")
        arms[name] = [Ckpt(f"{name}_s{i}", p) for i, p in enumerate(s for s in paths.split(",") if s)]
    compare, disp = [ckpt_spec(s) for s in split(a.compare)], [ckpt_spec(s) for s in split(a.displacement)]
    runs = []
    for item in split(a.runs):
        label, sep, d = item.partition("=")
        d = d if sep else item
        if not os.path.isfile(os.path.join(d, "metrics.jsonl")):
            raise SystemExit(f"--runs {d}: no metrics.jsonl there")
        runs.append((label if sep else os.path.basename(os.path.normpath(d)), d))
    if compare and len(compare) != 2:
        raise SystemExit(f"--compare takes two checkpoints, BASE OTHER; got {len(compare)}")
    if disp and len(disp) != 3:
        raise SystemExit(f"--displacement takes three checkpoints, BASE LOW HIGH; got {len(disp)}")
    if not (ckpts or arms or compare or disp or runs):
        raise SystemExit("nothing to do: give --ckpt, --arms, --compare, --displacement and/or --runs")
    for c in ckpts + [c for cs in arms.values() for c in cs] + compare + disp:
        check_model_path(c.path)
    if a.entropy_samples < 0:
        raise SystemExit(f"--entropy-samples must be >= 0 (0: off), got {a.entropy_samples}")
    if a.micro_batch_tokens is not None and a.micro_batch_tokens <= 0:
        raise SystemExit(f"--micro-batch-tokens must be positive, got {a.micro_batch_tokens}")
    for name in ("k", "max_tokens", "gen_chunk", "hf_batch_size", "compare_problems", "compare_n", "analysis_tokens",
                 "chunk_size", "n_boot"):
        if getattr(a, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if a.temperature <= 0 or not 0 < a.top_p <= 1:
        raise SystemExit("--temperature must be > 0 and --top-p in (0, 1]")
    benches = benchmark_specs(a.benchmarks) if (ckpts or arms or compare) else []
    compare_benches = benchmark_specs(a.compare_data) if compare and a.compare_data else benches
    return dict(ckpts=ckpts, arms=arms, compare=compare, disp=disp, runs=runs, benches=benches,
                compare_benches=compare_benches)


# ----------------------------------------------------------------------------- sampling

def settings_tag(a: Args, n: int, with_ids: bool = False) -> str:
    """What the samples depend on (the engine is not included: recorded in the cache's .meta.json)."""
    return (f"n{n}_T{a.temperature:g}_p{a.top_p:g}_L{a.max_tokens}_{a.prompt_style}_s{a.seed}"
            f"_cut{'graded' if a.grade_truncated else 'wrong'}" + ("_ids" if with_ids else ""))


def problem_seed(a: Args, bench: str, pid: str) -> int:
    return derive_seed(a.seed, zlib.crc32(bench.encode()), zlib.crc32(pid.encode()), 3)


def sample_and_grade(a: Args, engine, tokenizer, bench: str, problems, n: int, with_ids: bool) -> list[dict]:
    """One cache row per problem: n samples, each with its extracted answer and grade."""
    prompts = [render_prompt(p, tokenizer, a.prompt_style) for p in problems]
    seeds = [problem_seed(a, bench, p.id) for p in problems]
    kw = dict(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens)
    # one seed per problem (vLLM: per request; HF: one stream per sampled row): batch composition does not matter
    groups = engine.generate(prompts, n=n, seeds=seeds, **kw)
    texts = [s.text for g in groups for s in g]
    correct = grade_batch(texts, [p.answer for p, g in zip(problems, groups) for _ in g],
                          is_choice=[p.is_choice for p, g in zip(problems, groups) for _ in g],
                          num_workers=a.grade_workers, timeout_s=a.grade_timeout)
    correct = truncated_is_wrong(correct, [s.finish_reason for g in groups for s in g], a.grade_truncated)
    rows, i = [], 0
    for p, g in zip(problems, groups):
        samples = []
        for s in g:
            row = {"text": s.text, "answer": extract_answer(s.text), "correct": correct[i],
                   "length": len(s.response_ids), "finish_reason": s.finish_reason}
            if with_ids:
                row["ids"] = s.response_ids
            samples.append(row)
            i += 1
        rows.append({"id": p.id, "samples": samples})
    return rows


# ----------------------------------------------------------------------------- model loading

def hf_model(path: str, device, dtype: torch.dtype | None = None):
    """Inference model; dtype None: bf16 on CUDA (what HF-engine generation needs), float32 elsewhere."""
    from transformers import AutoModelForCausalLM
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)


def release():
    """Return the memory of models the caller has dropped (vLLM and CUDA keep caches otherwise)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the comparison

def consecutive_rows(seqs: list[tuple], budget: int) -> list[list[tuple]]:
    """(prompt ids, response ids, ...) tuples -> the padding-free packed rows of consecutive sequences, at most
    `budget` tokens each (a longer sequence alone), in order."""
    parts, size = [], budget
    for seq in seqs:
        if size + len(seq[0]) + len(seq[1]) > budget:
            parts.append([])
            size = 0
        parts[-1].append(seq)
        size += len(seq[0]) + len(seq[1])
    return parts


@torch.no_grad()
def score_sequences(path: str, seqs: list[tuple[list[int], list[int], np.ndarray]], a: Args, device) -> dict:
    """One model's view of fixed sequences (prompt ids, response ids, the response positions to keep): each
    layer's output there (forward hooks on the embedding, every decoder layer and the final norm, because
    output_hidden_states replaces the last layer's output by the norm's; CPU, [N, D] each), the final hidden
    states and the lm_head weight in float32 on the device.

    The forward runs in float32 on every device (a 4B model: 16 GB): in bf16 the rounding of every activation,
    and of a closed-form checkpoint's norm.weight / tau per channel, is itself a change that is no temperature,
    and it moved tau* of the exact closed form by ~3e-3 on the tiny model."""
    lm = hf_model(path, device, torch.float32)
    modules = [lm.model.embed_tokens, *lm.model.layers, lm.model.norm]
    names = ["embed"] + [f"layer_{i + 1}" for i in range(len(lm.model.layers))] + ["final_norm"]
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(
        i, out[0] if isinstance(out, tuple) else out)) for i, m in enumerate(modules)]
    hidden = [[] for _ in modules]
    final = []
    for part in consecutive_rows(seqs, a.micro_batch_tokens):     # kept rows stay in (sequence, position) order
        ids, pos, _, _ = pack_padding_free([(p, r) for p, r, _ in part], device)
        keep, offset = torch.zeros_like(ids, dtype=torch.bool), 0
        for p, r, picks in part:
            keep[0, offset + len(p) - 1 + torch.as_tensor(picks, device=device)] = True   # the state at t predicts t+1
            offset += len(p) + len(r)
        lm.model(input_ids=ids, position_ids=pos, use_cache=False)
        for i in range(len(modules)):
            hidden[i].append(captured[i][keep].cpu())            # [n, D] rows in (sequence, position) order
        final.append(captured[len(modules) - 1][keep].float())
    for h in hooks:
        h.remove()
    weight = lm.get_output_embeddings().weight.detach().float().clone()
    out = {"names": names, "hidden": [torch.cat(h) for h in hidden], "final": torch.cat(final), "weight": weight}
    captured.clear()
    del lm, modules
    release()
    return out


@torch.no_grad()
def own_entropy(path: str, benches: dict[str, tuple[list, list[dict]]], a: Args, device) -> dict[str, float]:
    """ent_t1 per benchmark ({bench: (problems, cache rows)}, one model load): mean next-token entropy at T=1
    (nats) of the model at `path` over the response tokens of its own first --entropy-samples samples per
    problem (every response token weighs the same), in float32, packed."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    lm = hf_model(path, device, torch.float32)
    weight = lm.get_output_embeddings().weight.detach().float()
    out = {}
    for bench, (problems, rows) in benches.items():
        seqs = [(tok(render_prompt(p, tok, a.prompt_style), add_special_tokens=False).input_ids, s["ids"])
                for p, r in zip(problems, rows) for s in r["samples"][:a.entropy_samples] if s["ids"]]
        total, count = 0.0, 0
        for part in consecutive_rows(seqs, a.micro_batch_tokens):
            ids, pos, pred, _ = pack_padding_free(part, device)
            h = lm.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[pred].float()
            total += float(entropy_from_hidden(h, weight, 1.0, chunk_size=a.chunk_size, compiled=False).double().sum())
            count += h.shape[0]
        out[bench] = total / count if count else math.nan
    del lm
    release()
    return out


def diversity(groups: list[list[dict]]) -> dict:
    return {"distinct_answers": float(np.mean([distinct_count([s["answer"] for s in g]) for g in groups])),
            "distinct_responses": float(np.mean([len({s["text"] for s in g}) for g in groups])),
            "accuracy": float(np.mean([s["correct"] for g in groups for s in g])),
            "response_len": float(np.mean([s["length"] for g in groups for s in g])),
            "n_groups": len(groups), "n": len(groups[0]) if groups else 0}


def param_displacement(base_path: str, other_path: str) -> dict:
    """||theta_other - theta_base|| per layer group, absolute and relative to ||theta_base||."""
    wa, wb = Weights(base_path), Weights(other_path)
    delta, groups = Delta(wa, wb), {}
    for name in delta:
        g = groups.setdefault(layer_of(name), [0.0, 0.0])
        g[0] += sq_norm(delta[name])
        g[1] += sq_norm(wa[name])
    per = [{"name": k, "delta_norm": math.sqrt(d), "base_norm": math.sqrt(b),
            "relative": math.sqrt(d / b) if b > 0 else math.nan} for k, (d, b) in groups.items()]
    d_all, b_all = sum(v[0] for v in groups.values()), sum(v[1] for v in groups.values())
    return {"delta_norm": math.sqrt(d_all), "base_norm": math.sqrt(b_all),
            "relative": math.sqrt(d_all / b_all) if b_all > 0 else math.nan, "per_layer": per}


def compare_models(a: Args, base: Ckpt, other: Ckpt, rows_base: dict, rows_other: dict, problems, device) -> dict:
    """The comparison section of the docstring; rows_*: {benchmark: {id: cache row}} of --compare-n samples."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base.path)
    if len(tok) != len(AutoTokenizer.from_pretrained(other.path)):
        raise SystemExit(f"--compare: {base.label} and {other.label} have different vocabularies")
    groups = {"base": [], "other": []}
    seqs = []                                           # BASE's first sample of every prompt
    for bench, p in problems:
        groups["base"].append(rows_base[bench][p.id]["samples"])
        groups["other"].append(rows_other[bench][p.id]["samples"])
        seqs.append((tok(render_prompt(p, tok, a.prompt_style), add_special_tokens=False).input_ids,
                     rows_base[bench][p.id]["samples"][0]["ids"]))
    # analysed positions: uniform over all of their response tokens, not the first responses' first tokens
    offsets = np.cumsum([0] + [len(r) for _, r in seqs])
    flat = np.sort(np.random.default_rng(a.seed).choice(offsets[-1], min(offsets[-1], a.analysis_tokens),
                                                        replace=False))
    chosen = []
    for (p_ids, r_ids), lo, hi in zip(seqs, offsets[:-1], offsets[1:]):
        picks = flat[(flat >= lo) & (flat < hi)] - lo
        if len(picks):
            chosen.append((p_ids, r_ids[:picks[-1] + 1], picks))   # nothing after the last pick is scored
    t0 = time.time()
    sb, so = score_sequences(base.path, chosen, a, device), score_sequences(other.path, chosen, a, device)
    lb, lo = LogitsFromHidden(sb["final"], sb["weight"]), LogitsFromHidden(so["final"], so["weight"])
    cs = a.chunk_size
    ent = {k: entropy_from_hidden(s["final"], s["weight"], 1.0, chunk_size=cs, compiled=False).cpu()
           for k, s in (("base", sb), ("other", so))}
    et = effective_temperature(lb, lo, taus=TAU_GRID, chunk_size=cs)
    ks = [k for k in (1, 5, 10) if k <= lb.shape[-1]]
    layers = [{"name": name, "cosine": mean_cosine(hb, ho), "cka": linear_cka(hb.to(device), ho.to(device))}
              for name, hb, ho in zip(sb["names"], sb["hidden"], so["hidden"])]
    res = {
        "base": base.label, "other": other.label, "base_path": base.path, "other_path": other.path,
        "settings": settings_tag(a, a.compare_n, True), "n_prompts": len(problems), "n_sequences": len(chosen),
        "n_tokens": lb.shape[0],
        "entropy": {k: float(v.double().mean()) for k, v in ent.items()},
        "sharpness": {"base": sharpness(lb, chunk_size=cs), "other": sharpness(lo, chunk_size=cs)},
        "effective_temperature": {
            "tau": et["tau"], "kl": et["kl"], "kl_at_1": et["kl_at_1"], "tau_at_bound": et["tau_at_bound"],
            "explained": 1 - et["kl"] / et["kl_at_1"] if et["kl_at_1"] > 0 else math.nan,
            "per_token": quantiles(et["tau_per_token"]) | {"nan_frac": float(et["tau_per_token"].isnan().double().mean())},
            "kl_curve": {str(t): v for t, v in et["kl_curve"].items()}},
        "topk_overlap": {str(k): v for k, v in topk_overlap(lb, lo, ks=ks, chunk_size=max(cs, 256)).items()},
        "layers": layers,
        "diversity": {k: diversity(g) for k, g in groups.items()},
        "displacement": param_displacement(base.path, other.path),
        "seconds": time.time() - t0,
    }
    res["_plots"] = {"entropy": ent, "tau": et["tau_per_token"]}
    return res

# ----------------------------------------------------------------------------- accuracy

def summarize_benchmark(rows: list[dict], k: int) -> dict:
    samples = [s for r in rows for s in r["samples"]]
    out = summarize([[(s["answer"], s["correct"]) for s in r["samples"]] for r in rows], k)
    out |= {"len": float(np.mean([s["length"] for s in samples])),
            "trunc": float(np.mean([s["finish_reason"] == "length" for s in samples])),
            "no_ans": float(np.mean([s["answer"] is None for s in samples]))}
    return out



# ----------------------------------------------------------------------------- main

def main(argv=None):
    argv = join_multi_flags(sys.argv[1:] if argv is None else list(argv))
    args = parse_args(Args, argv, description=__doc__)
    spec = check_args(args)

    # ------------------------------------------------------------------------- setup
    info = init_distributed(args.device)
    if args.micro_batch_tokens is None:
        args.micro_batch_tokens = 4096 if info.device.type == "cuda" else 512
    out = os.path.abspath(args.out)
    make_run_dir(os.path.dirname(out), "evaluate", dataclasses.asdict(args) | {"run_name": os.path.basename(out)},
                 rank=info.rank)
    engine_kind = args.rollout_engine
    if engine_kind == "auto":
        import importlib.util
        engine_kind = "vllm" if importlib.util.find_spec("vllm") else "hf"

    # one label per checkpoint directory, whichever flag named it first
    by_path, labels = {}, set()

    def register(c: Ckpt) -> Ckpt:
        key = os.path.abspath(os.path.expanduser(c.path))
        if key not in by_path:
            if c.label in labels:
                raise SystemExit(f"two checkpoints would both be labelled {c.label!r}: name them with label=path")
            labels.add(c.label)
            by_path[key] = Ckpt(c.label, c.path)
        return by_path[key]

    accuracy = [register(c) for c in spec["ckpts"]]
    arms = {name: [register(c) for c in cs] for name, cs in spec["arms"].items()}
    accuracy += [c for cs in arms.values() for c in cs if c not in accuracy]
    compare = [register(c) for c in spec["compare"]]
    for c in by_path.values():
        c.path = resolve_model_path(c.path)

    def load(source, path):
        try:
            ps = load_problems(source, path=path, limit=args.max_problems or None, seed=args.seed)
        except DataError as e:
            raise SystemExit(str(e))
        if len({p.id for p in ps}) != len(ps):
            raise SystemExit(f"{path or source}: problem ids are not unique")
        return ps

    problems = {label: load(source, path) for label, source, path in spec["benches"]} if accuracy else {}
    compare_problems = []
    if compare:
        pool = [(label, p) for label, source, path in spec["compare_benches"]
                for p in (problems.get(label) or load(source, path))]
        pick = np.random.default_rng(args.seed).permutation(len(pool))[:args.compare_problems]
        compare_problems = [pool[i] for i in sorted(pick)]

    # ------------------------------------------------------------------------- rollout: sample, grade, cache
    def cache_file(c: Ckpt, bench: str, n: int, with_ids: bool) -> str:
        return os.path.join(out, "generations", c.label, f"{bench}__{settings_tag(args, n, with_ids)}.jsonl")

    generated, jobs = {}, {}                    # jobs: label -> [(benchmark, problems, n, with_ids)]
    own_ids = args.entropy_samples > 0          # ent_t1 scores the cached response ids
    for c in by_path.values():
        jobs[c.label] = [(b, ps, args.k, own_ids) for b, ps in problems.items()] if c in accuracy else []
        if c in compare:
            for b in dict.fromkeys(b for b, _ in compare_problems):
                jobs[c.label].append((b, [p for bb, p in compare_problems if bb == b], args.compare_n, True))
    # ONE engine per process for every checkpoint, each next one's weights loaded in place: a vLLM engine's
    # shutdown destroys the default process group, which the ranks still need (and on GPU its memory may not be
    # free yet when the next engine starts). Under torchrun every checkpoint must therefore fit the first's engine.
    if engine_kind == "vllm" and info.distributed:
        first, *rest = [c for c in by_path.values() if jobs[c.label]] or [None]
        for c in rest:
            if why := architecture_difference(first.path, c.path):
                raise SystemExit(f"under torchrun, --rollout-engine vllm samples every checkpoint with one engine, "
                                 f"but {first.label} and {c.label} cannot share it ({why}): evaluate them in "
                                 f"separate commands (the same --out is fine), or in one process")
    engine = tokenizer = serving = None         # serving: the checkpoint whose weights the engine holds
    for c in by_path.values():
        fp = fingerprint(c.path) if jobs[c.label] else None
        for bench, ps, n, with_ids in jobs[c.label]:
            path = cache_file(c, bench, n, with_ids)
            meta_path = path.removesuffix(".jsonl") + ".meta.json"
            if os.path.exists(meta_path) and json.load(open(meta_path))["fingerprint"] != fp:   # every rank stops
                raise SystemExit(f"{path} was sampled from other weights than {c.path} (fingerprint differs): "
                                 f"delete it, or give this checkpoint another label or --out")
            done = None
            if info.is_main:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                done = set(read_cache(path, repair=True))
            done = all_gather_objects(done)[0]
            todo = [p for p in ps if p.id not in done]
            print0(f"[evaluate] {c.label} / {bench} ({settings_tag(args, n, with_ids)}): {len(ps) - len(todo)} cached, "
                   f"{len(todo)} to generate")
            generated[(c.label, bench, n)] = len(todo)
            if not todo:
                continue
            if serving is not c:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(c.path)
                if engine is not None and engine.name == "vllm" and not architecture_difference(serving.path, c.path):
                    engine.load_checkpoint_weights(c.path)
                else:                           # the first engine; HF (a new model); one process, another network
                    if engine is not None:
                        engine.close()
                        engine = None
                        release()
                    every = [p for ps_ in problems.values() for p in ps_] + [p for _, p in compare_problems]
                    max_prompt = max(len(tokenizer(render_prompt(p, tokenizer, args.prompt_style),
                                                   add_special_tokens=False).input_ids) for p in every)
                    limit = check_context_length(c.path, max_prompt, args.max_tokens, flag="--max-tokens")
                    engine = make_engine(engine_kind, model=hf_model(c.path, info.device) if engine_kind == "hf"
                                         else None, model_path=c.path, tokenizer=tokenizer, info=info,
                                         max_model_len=min(max_prompt + args.max_tokens + 8, limit or 1 << 30),
                                         seed=args.seed,
                                         hf_batch_size=args.hf_batch_size, vllm_gpu_memory=args.vllm_gpu_memory,
                                         vllm_kv_cache_gib=args.vllm_kv_cache_gib, vllm_tp=args.vllm_tp,
                                         vllm_sleep=False)
                serving = c
            if info.is_main:                    # atomic (dump): a rerun reads it back, also after a kill
                dump({"checkpoint": c.path, "fingerprint": fp, "benchmark": bench, "engine": engine.name,
                      "settings": settings_tag(args, n, with_ids)}, meta_path)
            per_round = args.gen_chunk * engine.dp_size
            t0 = time.time()
            for start in range(0, len(todo), per_round):
                part = todo[start:start + per_round]
                mine = part[engine.dp_rank::engine.dp_size]
                rows = sample_and_grade(args, engine, tokenizer, bench, mine, n, with_ids) if mine else []
                gathered = {r["id"]: r for rs in all_gather_objects(rows if engine.tp_rank == 0 else []) for r in rs}
                if info.is_main:
                    with open(path, "a") as f:
                        f.writelines(json.dumps(gathered[p.id]) + "\n" for p in part)
                print0(f"[evaluate] {c.label} / {bench}: {min(start + per_round, len(todo))}/{len(todo)} generated "
                       f"({time.time() - t0:.0f} s)")
    if engine is not None:
        engine.close()
        engine = None
        release()
    cleanup_distributed()                       # from here on rank 0 alone: analyses, tables, plots
    if not info.is_main:
        return out

    # ------------------------------------------------------------------------- accuracy
    results = {}
    tag = settings_tag(args, args.k)
    for c in accuracy:
        per_bench, per_problem, rows_of = {}, {}, {}
        for bench, ps in problems.items():
            cached = read_cache(cache_file(c, bench, args.k, own_ids))
            rows = rows_of[bench] = [cached[p.id] for p in ps]
            per_bench[bench] = summarize_benchmark(rows, args.k)
            per_problem[bench] = {r["id"]: float(np.mean([s["correct"] for s in r["samples"]])) for r in rows}
        if args.entropy_samples:
            for bench, ent in own_entropy(c.path, {b: (problems[b], rows_of[b]) for b in problems}, args,
                                          info.device).items():
                per_bench[bench]["ent_t1"] = ent
        macro = {key: float(np.mean([m[key] for m in per_bench.values()])) for key in next(iter(per_bench.values()))
                 if key not in ("n_problems", "k")} | {"n_problems": sum(m["n_problems"] for m in per_bench.values()),
                                                      "k": args.k}
        results[c.label] = {"label": c.label, "checkpoint": c.path, "settings": tag, "k": args.k,
                            "engine": engine_kind, "benchmarks": per_bench, "macro": macro, "per_problem": per_problem,
                            "generated": {b: generated.get((c.label, b, args.k), 0) for b in problems}}
        dump(results[c.label], os.path.join(out, "results", f"{c.label}__{tag}.json"))
        print0(f"[evaluate] {c.label}: macro avg@{args.k} {macro[f'avg@{args.k}']:.4f}")

    # ------------------------------------------------------------------------- seeds: CI per arm, paired bootstrap
    if arms:
        metric = f"avg@{args.k}"
        benches = list(problems) + ["macro"]
        rep = {"settings": tag, "metric": metric, "benchmarks": benches, "arms": {}, "tests": []}
        for name, cs in arms.items():
            per = {"n_seeds": len(cs), "checkpoints": [c.label for c in cs]}
            for b in benches:
                vals = [results[c.label]["macro" if b == "macro" else "benchmarks"] for c in cs]
                vals = [v[metric] if b == "macro" else v[b][metric] for v in vals]
                mean, lo, hi = mean_ci(vals)
                per[b] = {"mean": mean, "lo": lo, "hi": hi, "values": vals}
            rep["arms"][name] = per

        def seed_scores(cs, sel):                   # [seeds, problems]: per-problem accuracy of each seed
            return np.array([[results[c.label]["per_problem"][bb][p.id] for bb in sel for p in problems[bb]]
                             for c in cs])
        names = list(arms)
        for i, an in enumerate(names):
            for bn in names[i + 1:]:
                for b in list(problems) + ["all"]:
                    sel = list(problems) if b == "all" else [b]
                    sa, sb = seed_scores(arms[an], sel), seed_scores(arms[bn], sel)
                    # top level: problems only, on the seed-averaged accuracy (blind to which seeds were trained)
                    test = {"a": an, "b": bn, "benchmark": b} | paired_bootstrap(
                        sa.mean(0), sb.mean(0), n_boot=args.n_boot, seed=args.seed)
                    test["seed_bootstrap"] = hierarchical_bootstrap(sa, sb, n_boot=args.n_boot, seed=args.seed)
                    test["seed_paired_t"] = paired_seed_t(sa, sb) if len(sa) == len(sb) > 1 else None
                    rep["tests"].append(test)
        dump(rep, os.path.join(out, f"arms__{tag}.json"))

    # ------------------------------------------------------------------------- comparison and displacement
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    if compare:
        base, other = compare
        rows = {who: {b: read_cache(cache_file(c, b, args.compare_n, True)) for b in {b for b, _ in compare_problems}}
                for who, c in (("base", base), ("other", other))}
        res = compare_models(args, base, other, rows["base"], rows["other"], compare_problems, info.device)
        stem = f"compare__{base.label}__vs__{other.label}"
        plot_comparison(res, os.path.join(out, "plots", stem))
        dump(res, os.path.join(out, stem + ".json"))
        et = res["effective_temperature"]
        print0(f"[evaluate] {other.label} vs {base.label}: tau* {et['tau']:.4f}, entropy {res['entropy']['base']:.4f} -> "
               f"{res['entropy']['other']:.4f}, top-1 overlap {res['topk_overlap'].get('1', math.nan):.4f}")
    if spec["disp"]:
        base, low, high = spec["disp"]
        paths = [resolve_model_path(c.path) for c in (base, low, high)]
        wb = Weights(paths[0])
        m = displacement_metrics(Delta(wb, Weights(paths[1])), Delta(wb, Weights(paths[2])))
        groups = {}
        for name, d in m.pop("per_key").items():
            g = groups.setdefault(layer_of(name), [0.0, 0.0, 0.0])
            dot = d["cosine"] * d["low_norm"] * d["high_norm"] if math.isfinite(d["cosine"]) else 0.0
            g[0], g[1], g[2] = g[0] + d["low_norm"] ** 2, g[1] + d["high_norm"] ** 2, g[2] + dot
        m["per_layer"] = [{"name": k, "low_norm": math.sqrt(lo), "high_norm": math.sqrt(hi),
                           "cosine": dot / math.sqrt(lo * hi) if lo > 0 and hi > 0 else math.nan}
                          for k, (lo, hi, dot) in groups.items()]
        m |= {"base": base.label, "low": low.label, "high": high.label, "cos_low_high": -m["cosine"],
              "sign_convention": "cosine = cos(Delta_low, -Delta_high); reverse_coef = <Delta_low, -Delta_high> / "
                                 "||Delta_high||^2; both > 0 when LOW undoes HIGH"}
        dump(m, os.path.join(out, f"displacement__{base.label}__{low.label}__{high.label}.json"))
        print0(f"[evaluate] displacement: cos(low, -high) {m['cosine']:.4f}, reverse coef {m['reverse_coef']:.4f}")

    # ------------------------------------------------------------------------- save: plots of runs, results.md
    if spec["runs"]:
        plot_runs(spec["runs"], RUN_CURVES, os.path.join(out, "plots"))
        plot_summary(spec["runs"], SUMMARY_PANELS, os.path.join(out, "plots", "runs_summary.png"),
                     log_y=tuple(SUMMARY_PANELS)[:1])
    write_markdown(out)
    print0(f"[evaluate] done: {os.path.join(out, 'results.md')}")
    return out


if __name__ == "__main__":
    main()
