"""Cost of the real runs, ESTIMATED: wall time, GPU-hours and disk per stage, Qwen3-4B/8B-Base on N x H100.

    python bench/estimate_cost.py                                        # the paper's settings, 8 x H100, 4B and 8B
    python bench/estimate_cost.py --gpus 16 --mean-response 6000         # your own numbers: every assumption is a flag
    python bench/estimate_cost.py --decode-tok-s 3000 --mfu 0.4          # measured rates instead of the model's

Nothing here was measured on a GPU: these are estimates from a stated model and stated assumptions, each printed
with its source above the table (a flag the command line changed is marked "given"). Re-run with what the first
steps of your own run log in metrics.jsonl to turn them into forecasts: rl_dapo.py's perf/rollout_tokens_per_s
(all ranks, tail included: divide by the GPUs for --decode-tok-s, with --no-tail), rollout/response_len_mean
(--mean-response), rollout/gen_batches (--gen-batches-collapse / --gen-batches-arms) and time/update (--mfu).

Stages (their batch shapes read from the scripts' own defaults, their step counts from the README's commands):
    collapse   rl_dapo.py from the base model: 512 prompts x 16 responses kept per step, generation batches of
               1536 prompts drawn until 512 mixed groups are kept (dynamic sampling: --gen-batches-collapse per
               step on average), responses up to 20480 tokens, --collapse-steps steps
    reheat     reheat_tsopsd.py: 64 prompts x 8 responses per step at its --max-response-len, the frozen
               teacher's forward on top of the student's update, --reheat-steps steps; one run per seed
    arms       rl_dapo.py continued from the collapsed (or reheated) checkpoint, --arm-steps steps, one run per arm
               and seed; from a collapsed start more groups are uniform (--gen-batches-arms)
    evaluate   evaluate.py: every benchmark's problems x k samples per checkpoint (collapsed, reheated and each arm's
               final by default)

Time per step = rollout + update + validation (rl_dapo's, spread over its --val-every steps) + a fixed overhead:
- rollout (vLLM, --vllm-tp 1, one engine per GPU): generated tokens / (decode rate per GPU x GPUs), plus a tail per
  generation round (the round ends with its longest response: ~Lmax decode steps at small batch, each reading the
  weights once). Generated tokens come from a response-length distribution: gamma with mean --mean-response (at
  the RL limit of 20480) and coefficient of variation --length-cv, clipped at each stage's limit.
  Decode rate (unless --decode-tok-s): decode is memory-bound; each decode step reads the bf16 weights once and the
  KV cache of every running sequence, so with B sequences running at mean context c (time-averaged: prompt +
  E[l^2] / 2E[l]) a step takes (2 B/param x matmul params + B x c x KV bytes/token) / (HBM bandwidth x efficiency)
  and yields B tokens. B = min(vLLM's max_num_seqs, KV-cache tokens / c, sequences per GPU in the round); the
  KV-cache tokens are bench/estimate_memory.py --rollout's budget (the memory plan: what is free beside the
  training state at the scripts' default --vllm-gpu-memory; evaluate.py's 0.85 of the card).
- update: forward-equivalents x (2 x matmul params x tokens + attention) / (GPUs x peak bf16 FLOP/s x MFU), over
  the kept groups' prompt + response tokens. Forward-equivalents: forward 1 + backward 2 + activation-checkpointing
  recompute 1 (the scripts' CUDA default) + one more forward where a stage has one: rl_dapo recomputes the old
  log-probs when a step has more than one mini-batch (512 / 32 = 16 here; DAPO has no reference model), reheat runs
  the frozen teacher. That is 6N + 2N + 2N = 10N per token. Attention (--attention-flops): 4 x layers x heads x
  head_dim x position FLOPs per token and forward (QK^T and AV, causal), from the config.
  Matmul params: the counted parameters less an untied input embedding (a lookup, no FLOPs; a tied one is the head).

Disk (common/checkpoint.py's layout): a resumable checkpoint is the fp32 weights (4 B/param, resume/model) + AdamW's
two fp32 moments (8 B/param, resume/optimizer) + the HF export in the model's stored dtype (bf16, 2 B/param) + the
tokenizer and configs (--extra-mb); final/ and a snapshot are the HF export alone. A save writes the new checkpoint
before pruning, so --keep-last K holds up to K + 1 during a save; a run ends with min(K, saves) checkpoints + final/.

Not modelled: checkpoint writes (an 8B checkpoint is 115 GB), model loading beyond --startup-s, preemption and
requeues, multi-node communication, the hot arm's longer responses, stragglers beyond the tail.
Writes bench/results/estimate_cost.json.
"""
import argparse
import dataclasses
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOUR = 3600.0
GB = 1e9

# Benchmark sizes (problems): the hub sets common/data.py loads; OlympiadBench's config has 674 rows on the hub
# (common/data.py's docstring); GPQA-diamond 198; AIME 2024 and 2025 30 each; AMC23 40; MATH-500 500; Minerva 272.
BENCHMARK_SIZES = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272, "olympiadbench": 674,
                   "gpqa_diamond": 198}

# A cited short-context figure to compare the decode model with (printed, not used): Red Hat's MLPerf Inference v5.1
# submission, Llama-3.1-8B in FP8 on one H100 with vLLM 0.10.0, Offline scenario (CNN/DailyMail summaries).
CITED_DECODE = ("5,777 tok/s: Llama-3.1-8B FP8, 1 x H100, vLLM 0.10.0, MLPerf Inference v5.1 Offline "
                "(Red Hat blog, 'Efficient and reproducible LLM inference: Red Hat MLPerf Inference v5.1 results'); "
                "short contexts and FP8 weights, so an upper bound for bf16 at 20k-token contexts")


def _script_defaults():
    """The Args defaults of rl_dapo.py, reheat_tsopsd.py and evaluate.py (the estimates follow the scripts)."""
    import evaluate
    import reheat_tsopsd
    import rl_dapo

    def defaults(mod):
        return argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(mod.Args)
                                     if f.default is not dataclasses.MISSING})
    return defaults(rl_dapo), defaults(reheat_tsopsd), defaults(evaluate)


# ----------------------------------------------------------------------------- response lengths

def _gammainc(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x)."""
    import torch
    return float(torch.special.gammainc(torch.tensor(a, dtype=torch.float64), torch.tensor(x, dtype=torch.float64)))


@dataclasses.dataclass
class Lengths:
    """Response lengths ~ Gamma(shape 1/cv^2, scale theta), clipped at a stage's limit (cv 0: every response is the
    mean). `for_mean` picks theta so that the mean clipped at `limit` is `mean`."""
    cv: float
    theta: float          # gamma scale (cv 0: the fixed length)

    @classmethod
    def for_mean(cls, mean: float, cv: float, limit: int) -> "Lengths":
        if not 0 < mean < limit:
            raise SystemExit(f"--mean-response {mean} must be > 0 and below the RL limit {limit}")
        if cv == 0:
            return cls(0.0, float(mean))
        lo, hi = 1e-6, mean * cv * cv
        while cls(cv, hi).moments(limit)[0] < mean:
            hi *= 2
            if hi > 1e12:
                raise SystemExit(f"--mean-response {mean} cannot be reached below the limit {limit} with cv {cv}")
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cls(cv, mid).moments(limit)[0] < mean else (lo, mid)
        return cls(cv, (lo + hi) / 2)

    @property
    def shape(self) -> float:
        return 1.0 / (self.cv * self.cv)

    def moments(self, limit: int) -> tuple[float, float, float]:
        """E[min(l, L)], E[min(l, L)^2], P(l >= L)."""
        if self.cv == 0:
            x = min(self.theta, limit)
            return x, x * x, float(self.theta >= limit)
        k, th, z = self.shape, self.theta, limit / self.theta
        tail = 1.0 - _gammainc(k, z)
        m1 = k * th * _gammainc(k + 1, z) + limit * tail
        m2 = k * (k + 1) * th * th * _gammainc(k + 2, z) + limit * limit * tail
        return m1, m2, tail

    def longest(self, n: float, limit: int) -> float:
        """About the longest of n responses: the (1 - 1/n) quantile, clipped at the limit."""
        if self.cv == 0:
            return min(self.theta, limit)
        if n <= 1:
            return min(self.moments(limit)[0], limit)
        q, k = 1.0 - 1.0 / n, self.shape
        lo, hi = 0.0, float(limit)
        if _gammainc(k, hi / self.theta) <= q:
            return float(limit)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _gammainc(k, mid / self.theta) < q else (lo, mid)
        return (lo + hi) / 2


# ----------------------------------------------------------------------------- the model's shapes

def model_facts(spec: str, a) -> dict:
    """Parameter counts (a meta-device model built from the shipped config, a tied head once, as
    common/checkpoint.count_params counts them), attention shapes and, from bench/estimate_memory.py's memory plan,
    the KV-cache tokens per GPU during each stage's rollout."""
    import estimate_memory as em
    cfg = em.load_config(spec, "sdpa")
    lm = em.make_lm(cfg)
    n = sum(p.numel() for p in lm.parameters())
    embed = lm.get_input_embeddings().weight.numel()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = {}
    for stage, util in (("rl", None), ("reheat", None), ("eval", a.eval_gpu_memory)):
        r = em.rollout_budget(cfg, "rl" if stage == "eval" else stage, a.gpus, a.gpu_gib, a.context_gib,
                              a.vllm_overhead_gib, util)
        kv[stage] = r["kv_tokens"]
    return {"config": spec, "params": n, "matmul_params": n - (0 if tied else embed), "tied": tied,
            "layers": cfg.num_hidden_layers, "attn_dim": cfg.num_attention_heads * head_dim,
            "kv_bytes_per_token": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2,
            "kv_tokens": kv}


# ----------------------------------------------------------------------------- time

def decode_rate(m: dict, a, kv_tokens: float, ctx: float, seqs_per_gpu: float) -> tuple[float, float]:
    """(tokens/s per GPU, concurrent sequences B) of the bandwidth model, or --decode-tok-s as given."""
    b = max(1.0, min(a.max_num_seqs, kv_tokens / ctx, seqs_per_gpu))
    if a.decode_tok_s:
        return a.decode_tok_s, b
    bw = a.hbm_tb_s * 1e12 * a.hbm_efficiency
    step = (2 * m["matmul_params"] + b * ctx * m["kv_bytes_per_token"]) / bw
    compute = b * (2 * m["matmul_params"] + (4 * m["layers"] * m["attn_dim"] * ctx if a.attention_flops else 0)) \
        / (a.peak_tflops * 1e12 * a.mfu)
    return b / max(step, compute), b


def rollout_round(m: dict, a, lengths: Lengths, limit: int, prompts: int, n: int, kv_tokens: float) -> dict:
    """Seconds of one generation round: `prompts` dealt to the GPUs, `n` responses each (every rank waits for the
    last response of the round)."""
    mean, m2, _ = lengths.moments(limit)
    ctx = a.prompt_tokens + m2 / (2 * mean)
    per_gpu = math.ceil(prompts / a.gpus) * n
    rate, b = decode_rate(m, a, kv_tokens, ctx, per_gpu)
    tail = (lengths.longest(prompts * n, limit) * 2 * m["matmul_params"] / (a.hbm_tb_s * 1e12 * a.hbm_efficiency)
            if a.tail else 0.0)
    return {"seconds": per_gpu * mean / rate + tail, "tokens": prompts * n * mean, "rate": rate, "concurrency": b,
            "tail_s": tail}


def train_seconds(m: dict, a, lengths: Lengths, limit: int, sequences: float, extra_forward: bool) -> dict:
    """Seconds of one update over `sequences` (prompt + response) with the stage's forward-equivalents."""
    mean, m2, _ = lengths.moments(limit)
    p = a.prompt_tokens
    tokens = sequences * (p + mean)
    passes = 3 + (1 if a.activation_checkpointing else 0) + (1 if extra_forward else 0)
    dense = 2 * m["matmul_params"] * tokens
    # sum over a sequence's positions t < p + l of 4 x layers x attn_dim x t = 2 x layers x attn_dim x (p + l)^2
    attention = sequences * 2 * m["layers"] * m["attn_dim"] * (p * p + 2 * p * mean + m2) if a.attention_flops else 0
    flops = passes * (dense + attention)
    return {"seconds": flops / (a.gpus * a.peak_tflops * 1e12 * a.mfu), "tokens": tokens, "flops": flops,
            "passes": passes}


def stage_rows(m: dict, a, rl, rh, ev, lengths: Lengths) -> list[dict]:
    """One row per stage: tokens and hours per step, steps, runs, wall-clock hours and GPU-hours."""
    rows = []

    def rl_like(name, steps, runs, gen_batches):
        rnd = rollout_round(m, a, lengths, rl.max_response_len, rl.gen_batch_prompts, rl.group_size,
                            m["kv_tokens"]["rl"])
        # validation (--val-every, --val-n on --val-problems), spread over the steps
        val = rollout_round(m, a, lengths, rl.max_response_len, a.val_problems, a.val_n, m["kv_tokens"]["rl"]) \
            if a.val_every > 0 and a.val_problems > 0 else {"seconds": 0.0}
        val_s = val["seconds"] / a.val_every if a.val_every > 0 else 0.0
        tr = train_seconds(m, a, lengths, rl.max_response_len, rl.prompts_per_step * rl.group_size,
                           extra_forward=rl.prompts_per_step // rl.ppo_mini_batch > 1)
        rollout_s = gen_batches * rnd["seconds"]
        step_s = rollout_s + tr["seconds"] + val_s + a.step_overhead_s
        worst = a.max_gen_batches * rnd["seconds"] + tr["seconds"] + val_s + a.step_overhead_s
        return dict(stage=name, script="rl_dapo.py", runs=runs, steps=steps, gen_batches=gen_batches,
                    gen_tokens_per_step=gen_batches * rnd["tokens"], train_tokens_per_step=tr["tokens"],
                    decode_tok_s_per_gpu=rnd["rate"], concurrency_per_gpu=rnd["concurrency"],
                    tail_s_per_round=rnd["tail_s"], rollout_h_per_step=rollout_s / HOUR,
                    train_h_per_step=tr["seconds"] / HOUR, val_h_per_step=val_s / HOUR, h_per_step=step_s / HOUR,
                    h_per_step_at_max_gen_batches=worst / HOUR, forward_equivalents=tr["passes"],
                    wall_h=runs * (steps * step_s + a.startup_s) / HOUR)

    rows.append(rl_like("collapse", a.collapse_steps, 1, a.gen_batches_collapse))

    rnd = rollout_round(m, a, lengths, a.reheat_max_response, rh.prompts_per_step, rh.group_size,
                        m["kv_tokens"]["reheat"])
    tr = train_seconds(m, a, lengths, a.reheat_max_response, rh.prompts_per_step * rh.group_size, extra_forward=True)
    step_s = rnd["seconds"] + tr["seconds"] + a.step_overhead_s
    rows.append(dict(stage="reheat", script="reheat_tsopsd.py", runs=a.seeds, steps=a.reheat_steps, gen_batches=1,
                     gen_tokens_per_step=rnd["tokens"], train_tokens_per_step=tr["tokens"],
                     decode_tok_s_per_gpu=rnd["rate"], concurrency_per_gpu=rnd["concurrency"],
                     tail_s_per_round=rnd["tail_s"], rollout_h_per_step=rnd["seconds"] / HOUR,
                     train_h_per_step=tr["seconds"] / HOUR, h_per_step=step_s / HOUR,
                     forward_equivalents=tr["passes"],
                     wall_h=a.seeds * (a.reheat_steps * step_s + a.startup_s) / HOUR))

    rows.append(rl_like("arms", a.arm_steps, a.arms * a.seeds, a.gen_batches_arms))

    # evaluation: per checkpoint, per benchmark, rounds of --gen-chunk problems per rank (evaluate.py)
    eval_lengths = lengths if a.eval_mean_response is None else \
        Lengths.for_mean(a.eval_mean_response, a.length_cv, rl.max_response_len)
    per_round = ev.gen_chunk * a.gpus
    seconds, tokens, rates, tails = 0.0, 0.0, [], 0.0
    for bench in a.benchmarks:
        n = BENCHMARK_SIZES[bench]
        for start in range(0, n, per_round):
            problems = min(per_round, n - start)
            r = rollout_round(m, a, eval_lengths, a.eval_max_tokens, problems, a.k, m["kv_tokens"]["eval"])
            seconds += r["seconds"]
            tokens += r["tokens"]
            tails += r["tail_s"]
            rates.append(r["rate"])
    step_s = seconds + a.step_overhead_s
    rows.append(dict(stage="evaluate", script="evaluate.py", runs=1, steps=a.eval_checkpoints, gen_batches=None,
                     gen_tokens_per_step=tokens, train_tokens_per_step=0,
                     decode_tok_s_per_gpu=tokens / a.gpus / (seconds - tails) if seconds > tails else max(rates),
                     concurrency_per_gpu=None, tail_s_per_round=tails, rollout_h_per_step=seconds / HOUR,
                     train_h_per_step=0.0, h_per_step=step_s / HOUR, forward_equivalents=0,
                     wall_h=(a.eval_checkpoints * step_s + a.startup_s) / HOUR))
    for r in rows:
        r["gpu_h"] = r["wall_h"] * a.gpus
        r["config"] = os.path.basename(m["config"].rstrip("/"))
    return rows


# ----------------------------------------------------------------------------- disk

def run_disk(ckpt: float, final: float, snapshot: float, steps: int, save_every: int, keep_last: int,
             snapshot_every: int) -> dict:
    """Bytes of one run's directory: its peak (during the last save) and what it leaves at the end."""
    saves = len({s for s in range(1, steps + 1) if save_every and s % save_every == 0} | {steps})
    keep = saves if keep_last <= 0 else min(saves, keep_last)
    during = saves if keep_last <= 0 else min(saves, keep_last + 1)
    snaps = steps // snapshot_every if snapshot_every > 0 else 0
    end = keep * ckpt + final + snaps * snapshot
    return {"saves": saves, "checkpoints_at_end": keep, "snapshots": snaps,
            "peak_gb": (max(during * ckpt, keep * ckpt + final) + snaps * snapshot) / GB, "end_gb": end / GB}


def disk_rows(m: dict, a, rl, rh) -> dict:
    from common.checkpoint import checkpoint_bytes
    import torch
    extra = a.extra_mb * 1e6
    ckpt = checkpoint_bytes(m["params"], torch.bfloat16) + extra           # 4 + 8 + 2 B/param
    hf = m["params"] * 2 + extra                                            # final/ and a snapshot: the bf16 export
    runs = {"collapse": run_disk(ckpt, hf, hf, a.collapse_steps, a.save_every, a.keep_last, a.snapshot_every),
            "reheat": run_disk(ckpt, hf, hf, a.reheat_steps, a.reheat_save_every, a.keep_last, 0),
            "arm": run_disk(ckpt, hf, hf, a.arm_steps, a.save_every, a.keep_last, 0)}
    n_runs = {"collapse": 1, "reheat": a.seeds, "arm": a.arms * a.seeds}
    end = sum(runs[k]["end_gb"] * n_runs[k] for k in runs)
    # the largest moment: every finished run's leftovers + the run in progress at its peak
    peak = max(end - runs[k]["end_gb"] + runs[k]["peak_gb"] for k in runs)
    return {"config": os.path.basename(m["config"].rstrip("/")), "checkpoint_gb": ckpt / GB, "final_gb": hf / GB,
            "snapshot_gb": hf / GB, "runs": runs, "run_counts": n_runs, "reproduction_end_gb": end,
            "reproduction_peak_gb": peak}


# ----------------------------------------------------------------------------- arguments

def build_parser(rl, rh, ev):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every default's source is printed above the table.")
    sources = {}

    def add(flag, default, source, **kw):
        sources[flag.lstrip("-").replace("-", "_")] = source
        p.add_argument(flag, default=default, help=f"{source} (default: {default})", **kw)

    add("--configs", ["4b", "8b"], "assets/configs (parameters counted on a meta-device model, a tied head once)",
        nargs="+")
    add("--gpus", 8, "one 8 x H100 node (the paper does not say what it ran on)", type=int)
    # hardware
    add("--peak-tflops", 989.0, "H100 SXM dense bf16 (NVIDIA datasheet: 1,979 with 2:4 sparsity)", type=float)
    add("--hbm-tb-s", 3.35, "H100 SXM HBM3 bandwidth (NVIDIA datasheet)", type=float)
    add("--mfu", 0.35, "ASSUMPTION: training model-FLOPs utilisation (FSDP, bf16, checkpointing, long packed rows)",
        type=float)
    add("--hbm-efficiency", 0.6, "ASSUMPTION: fraction of HBM bandwidth vLLM's decode steps reach", type=float)
    add("--decode-tok-s", None, "decode tokens/s per GPU; unset: the bandwidth model (see --help); cross-check: "
        + CITED_DECODE, type=float)
    add("--max-num-seqs", 1024, "vLLM's max_num_seqs for the offline LLM class on >= 70 GB cards (vllm/engine/"
        "arg_utils.py); the KV cache binds first here", type=int)
    add("--gpu-gib", 79.2, "usable memory of an 80 GB card (bench/estimate_memory.py)", type=float)
    add("--context-gib", 1.0, "ASSUMPTION: CUDA context + NCCL outside torch (bench/estimate_memory.py --rollout)",
        type=float)
    add("--vllm-overhead-gib", 3.0, "ASSUMPTION: vLLM activations + CUDA graphs (bench/estimate_memory.py --rollout)",
        type=float)
    add("--eval-gpu-memory", ev.vllm_gpu_memory, "evaluate.py --vllm-gpu-memory default", type=float)
    # lengths
    add("--mean-response", 4000.0, "ASSUMPTION: mean response tokens of Qwen3-Base under DAPO at L=20480 "
        "(reported runs range ~3-8k; it grows during RL)", type=float)
    add("--length-cv", 0.7, "ASSUMPTION: std/mean of response lengths (gamma, clipped at each stage's limit); "
        "0: every response the mean", type=float)
    add("--prompt-tokens", 200, "ASSUMPTION: DAPO instruction + problem + chat template", type=int)
    add("--eval-mean-response", None, "ASSUMPTION: mean response tokens at evaluation; unset: --mean-response",
        type=float)
    # schedule
    add("--collapse-steps", 300, "README's collapse command (the paper gives no count)", type=int)
    add("--gen-batches-collapse", 1.5, "ASSUMPTION: generation batches of 1536 prompts per step over the collapse "
        "run (1 while groups are mixed, more as they turn uniform)", type=float)
    add("--reheat-steps", rh.steps, "reheat_tsopsd.py --steps default", type=int)
    add("--reheat-max-response", rh.max_response_len, "reheat_tsopsd.py --max-response-len default", type=int)
    add("--arm-steps", 200, "README's continued-RL command", type=int)
    add("--arms", 3, "the paper's continued-RL arms: plain, rollout temperature, TS-OPSD", type=int)
    add("--gen-batches-arms", 2.0, "ASSUMPTION: generation batches per step of continued RL from a collapsed start, "
        "averaged over the arms (a collapsed plain arm needs more: the demo's collapsed steps took 3-4, README)",
        type=float)
    add("--max-gen-batches", rl.max_gen_batches, "rl_dapo.py --max-gen-batches default (the worst step)", type=int)
    add("--seeds", 1, "training seeds per arm (and reheat runs)", type=int)
    add("--benchmarks", list(BENCHMARK_SIZES), "evaluate.py's paper benchmarks (sizes in the script)", nargs="+",
        choices=list(BENCHMARK_SIZES))
    add("--k", ev.k, "evaluate.py --k default", type=int)
    add("--eval-max-tokens", ev.max_tokens, "evaluate.py --max-tokens default", type=int)
    add("--eval-checkpoints", None, "checkpoints evaluated; unset: collapsed + reheated per seed + each arm's final",
        type=int)
    add("--val-every", rl.val_every, "rl_dapo.py --val-every default (0: no periodic validation)", type=int)
    add("--val-n", rl.val_n, "rl_dapo.py --val-n default", type=int)
    add("--val-problems", 30, "validation problems: AIME 2024 (README's --val-data aime24; 0: none)", type=int)
    add("--step-overhead-s", 30.0, "ASSUMPTION: per step (per evaluated checkpoint): weight push, vLLM wake/sleep, "
        "grading", type=float)
    add("--startup-s", 600.0, "ASSUMPTION: per run: loading, vLLM start-up and CUDA graphs, compile, preflight",
        type=float)
    add("--tail", True, "count each generation round's tail (its longest response at small batch)",
        action=argparse.BooleanOptionalAction)
    add("--attention-flops", True, "count attention's matmuls in the update (from the config)",
        action=argparse.BooleanOptionalAction)
    add("--activation-checkpointing", True, "the scripts' CUDA default: one more forward in backward",
        action=argparse.BooleanOptionalAction)
    # disk
    add("--save-every", rl.save_every, "rl_dapo.py --save-every default", type=int)
    add("--keep-last", rl.keep_last, "rl_dapo.py / reheat_tsopsd.py --keep-last default", type=int)
    add("--reheat-save-every", rh.save_every, "reheat_tsopsd.py --save-every default (0: only at the end)", type=int)
    add("--snapshot-every", 25, "SUGGESTED for the collapse run (rl_dapo.py --snapshot-every, default 0): light bf16 "
        "copies to pick the collapse point afterwards (0: none)", type=int)
    add("--extra-mb", 20.0, "ASSUMPTION: tokenizer + configs per HF copy (Qwen3's tokenizer files ~16 MB)",
        type=float)
    add("--json", os.path.join(ROOT, "bench", "results", "estimate_cost.json"), "output path")
    return p, sources


def check(a) -> None:
    positive = dict(gpus=a.gpus, peak_tflops=a.peak_tflops, hbm_tb_s=a.hbm_tb_s, mfu=a.mfu,
                    hbm_efficiency=a.hbm_efficiency, max_num_seqs=a.max_num_seqs, mean_response=a.mean_response,
                    gen_batches_collapse=a.gen_batches_collapse, gen_batches_arms=a.gen_batches_arms, k=a.k,
                    reheat_steps=a.reheat_steps, collapse_steps=a.collapse_steps, arm_steps=a.arm_steps,
                    seeds=a.seeds, val_n=a.val_n, reheat_max_response=a.reheat_max_response,
                    eval_max_tokens=a.eval_max_tokens)
    for name, v in positive.items():
        if not v > 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in ("length_cv", "prompt_tokens", "step_overhead_s", "startup_s", "arms", "extra_mb", "val_every",
                 "val_problems", "snapshot_every", "save_every", "reheat_save_every"):
        if getattr(a, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    if a.mfu > 1 or a.hbm_efficiency > 1:
        raise SystemExit("--mfu and --hbm-efficiency are fractions: at most 1")
    if a.decode_tok_s is not None and a.decode_tok_s <= 0:
        raise SystemExit("--decode-tok-s must be > 0")
    if a.eval_checkpoints is not None and a.eval_checkpoints < 0:
        raise SystemExit("--eval-checkpoints must be >= 0")
    if a.eval_mean_response is not None and a.eval_mean_response <= 0:
        raise SystemExit("--eval-mean-response must be > 0")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    rl, rh, ev = _script_defaults()
    parser, sources = build_parser(rl, rh, ev)
    a = parser.parse_args(argv)
    check(a)
    defaults = vars(parser.parse_args([]))
    given = {k for k, v in vars(a).items() if v != defaults[k]}
    if a.eval_checkpoints is None:
        a.eval_checkpoints = 1 + a.seeds + a.arms * a.seeds
    lengths = Lengths.for_mean(a.mean_response, a.length_cv, rl.max_response_len)

    print("Cost of the real runs: ESTIMATES from a stated model (bench/estimate_cost.py --help), not measurements.")
    print("Assumptions (flag = value [source]; 'given': set on this command line):")
    for name, source in sources.items():
        if name == "json":
            continue
        v = getattr(a, name)
        mark = " given" if name in given else ""
        print(f"  --{name.replace('_', '-')} = {v if not isinstance(v, list) else ' '.join(map(str, v))}"
              f"  [{source}{';' if mark else ''}{mark}]")
    print(f"  scripts: rl_dapo {rl.prompts_per_step} prompts x {rl.group_size} kept per step, generation batches of "
          f"{rl.gen_batch_prompts} prompts, mini-batches of {rl.ppo_mini_batch}, L={rl.max_response_len}; reheat "
          f"{rh.prompts_per_step} x {rh.group_size}; evaluate k={a.k}, {ev.gen_chunk} problems per rank per round")
    clipped = {lim: lengths.moments(lim) for lim in (rl.max_response_len, a.reheat_max_response)}
    print("  response lengths: " + "; ".join(f"at L={lim}: mean {m1:.0f}, {100 * t:.2f}% cut at L"
                                             for lim, (m1, _, t) in clipped.items()))

    facts, rows, disks = [], [], []
    for spec in a.configs:
        m = model_facts(spec, a)
        facts.append(m)
        rows += stage_rows(m, a, rl, rh, ev, lengths)
        disks.append(disk_rows(m, a, rl, rh))

    print()
    hdr = (f"{'model':6} {'stage':9} {'runs':>4} {'steps':>5} {'gen Mtok/step':>13} {'train Mtok/step':>15} "
           f"{'tok/s/GPU':>9} {'rollout h':>9} {'train h':>7} {'h/step':>6} {'wall h':>7} {'days':>5} {'GPU-h':>7}")
    print(f"Time on {a.gpus} GPUs (per step: rollout + update + validation + {a.step_overhead_s:.0f} s overhead; "
          f"evaluate: per checkpoint; wall h = runs x (steps x h/step + start-up), run one after another)")
    print(hdr + "\n" + "-" * len(hdr))
    for cfg in dict.fromkeys(r["config"] for r in rows):
        total_wall = total_gpu = 0.0
        for r in (r for r in rows if r["config"] == cfg):
            total_wall += r["wall_h"]
            total_gpu += r["gpu_h"]
            print(f"{cfg:6} {r['stage']:9} {r['runs']:>4} {r['steps']:>5} {r['gen_tokens_per_step'] / 1e6:13.1f} "
                  f"{r['train_tokens_per_step'] / 1e6:15.1f} {r['decode_tok_s_per_gpu']:9.0f} "
                  f"{r['rollout_h_per_step']:9.3f} {r['train_h_per_step']:7.3f} {r['h_per_step']:6.3f} "
                  f"{r['wall_h']:7.1f} {r['wall_h'] / 24:5.1f} {r['gpu_h']:7.0f}")
        print(f"{cfg:6} {'total':9} {'':>4} {'':>5} {'':>13} {'':>15} {'':>9} {'':>9} {'':>7} {'':>6} "
              f"{total_wall:7.1f} {total_wall / 24:5.1f} {total_gpu:7.0f}")
    for cfg in dict.fromkeys(r["config"] for r in rows):
        rl_rows = [r for r in rows if r["config"] == cfg and r["script"] == "rl_dapo.py"]
        share = sum(r["rollout_h_per_step"] * r["steps"] * r["runs"] for r in rl_rows) / \
            sum(r["h_per_step"] * r["steps"] * r["runs"] for r in rl_rows)
        print(f"  {cfg}: rollout is {100 * share:.0f}% of the RL stages' step time (decode-bound: the rate per GPU "
              f"and the response length set the bill)")
    for r in rows:
        if "h_per_step_at_max_gen_batches" in r and r["stage"] == "arms":
            print(f"  {r['config']}: a step that draws all --max-gen-batches {a.max_gen_batches} generation batches "
                  f"(a collapsed plain arm) takes {r['h_per_step_at_max_gen_batches']:.2f} h; an average arm step "
                  f"{r['h_per_step']:.2f} h")

    print()
    hdr = (f"{'model':6} {'params':>6} {'ckpt GB':>7} {'final GB':>8} {'snap GB':>7} {'collapse run':>16} "
           f"{'reheat run':>14} {'arm run':>14} {'all runs':>14}")
    print(f"Disk (GB; runs: peak / at end; checkpoint = 14 B/param + {a.extra_mb:.0f} MB; collapse: --save-every "
          f"{a.save_every} --keep-last {a.keep_last} + a snapshot every {a.snapshot_every} steps; reheat: "
          f"--save-every {a.reheat_save_every}; all runs = 1 collapse + {a.seeds} reheat + {a.arms * a.seeds} arms)")
    print(hdr + "\n" + "-" * len(hdr))
    for m, d in zip(facts, disks):
        pe = lambda k: f"{d['runs'][k]['peak_gb']:.0f} / {d['runs'][k]['end_gb']:.0f}"  # noqa: E731
        both = f"{d['reproduction_peak_gb']:.0f} / {d['reproduction_end_gb']:.0f}"
        print(f"{d['config']:6} {m['params'] / 1e9:5.2f}B {d['checkpoint_gb']:7.1f} {d['final_gb']:8.1f} "
              f"{d['snapshot_gb']:7.1f} {pe('collapse'):>16} {pe('reheat'):>14} {pe('arm'):>14} {both:>14}")

    out = a.json
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    assumptions = {name: {"value": getattr(a, name), "source": src} for name, src in sources.items() if name != "json"}
    with open(out, "w") as f:
        json.dump({"note": "estimates from a stated model, not measurements (bench/estimate_cost.py)",
                   "assumptions": assumptions,
                   "lengths": {"gamma_shape": None if lengths.cv == 0 else lengths.shape, "gamma_scale": lengths.theta,
                               **{f"L{lim}": {"mean": m1, "mean_sq": m2, "cut_frac": t}
                                  for lim, (m1, m2, t) in clipped.items()}},
                   "models": facts, "stages": rows, "disk": disks}, f, indent=1)
    print(f"wrote {out}")
    return {"models": facts, "stages": rows, "disk": disks}


if __name__ == "__main__":
    main()
