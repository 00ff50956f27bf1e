"""Padding-free token-budget micro-batches vs right-padded fixed-count micro-batches.

1. Token accounting at the paper's shapes (no model): computed tokens per real token of a DAPO step, with
   response lengths drawn from a long-tailed law (log-normal, mean ~3k tokens, capped at 20,480; prompts
   ~200 tokens), 512 prompts x 16 samples in mini-batches of 32 prompts over W ranks. The old path: each rank
   takes an equal-count slice of the mini-batch and right-pads micro-batches of 8 sequences to their longest.
   Also the per-rank token imbalance (max rank load / mean), what the slowest rank waits on.
2. Measured on this machine: one forward+backward of rl_dapo's head over the demo's batch (128 sequences of
   ~20 prompt + up to 64 response tokens) on the shipped tiny model, padded micro-batches of 64 sequences vs
   packed rows of 512 / 1024 / 4096 tokens, side by side in one process (ratios only; CPU times are not GPU
   times). On CPU the packed row's sdpa attention uses a dense block-diagonal [T, T] mask, so the cost grows
   with the budget: the demo uses 1024.

    python bench/bench_packing.py            # prints two tables, writes bench/results/packing.json
"""
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.batching import pack_padding_free, plan_micro_batches  # noqa: E402
from common.dist import DistInfo, shard_model  # noqa: E402
from common.losses import chunked_logprob_entropy  # noqa: E402
from common.rollout import pack_sequences  # noqa: E402


def paper_lengths(rng, n, cap=20480, prompt=200):
    """Long-tailed response lengths: log-normal with mean ~3k, capped at the DAPO limit."""
    return [prompt + min(cap, max(1, int(rng.lognormvariate(7.6, 0.9)))) for _ in range(n)]


def accounting(world: int, budget: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    lengths = paper_lengths(rng, 512 * 16)
    per_mini = 32 * 16
    real = padded = packed = 0
    imb_old, imb_new, n_micro_old, n_micro_new = [], [], 0, 0
    for lo in range(0, len(lengths), per_mini):
        mini = lengths[lo:lo + per_mini]
        real += sum(mini)
        k = len(mini) // world
        shares = [mini[r * k:(r + 1) * k] for r in range(world)]
        for sh in shares:                                       # old: 8 sequences per padded micro-batch
            for i in range(0, len(sh), 8):
                padded += max(sh[i:i + 8]) * len(sh[i:i + 8])
        n_micro_old += -(-k // 8)
        loads = [sum(sh) for sh in shares]
        imb_old.append(max(loads) / (sum(loads) / world))
        plan = plan_micro_batches(mini, budget, world)
        loads = [sum(mini[i] for mb in p if mb for i in mb) for p in plan]
        packed += sum(sum(mini[i] for i in mb) if mb else 2 for p in plan for mb in p)
        imb_new.append(max(loads) / (sum(loads) / world))
        n_micro_new += len(plan[0])
    n_mini = len(lengths) // per_mini
    return {"world": world, "budget": budget, "real_tokens": real, "mean_len": real / len(lengths),
            "padded_per_real": padded / real, "packed_per_real": packed / real,
            "rank_imbalance_old": max(imb_old), "rank_imbalance_new": max(imb_new),
            "micro_batches_per_rank_old": n_micro_old / n_mini, "micro_batches_per_rank_new": n_micro_new / n_mini}


def timing(model_dir: str, repeats: int = 3) -> list[dict]:
    from transformers import AutoModelForCausalLM
    rng = random.Random(0)
    seqs = [([rng.randrange(3, 60) for _ in range(rng.randint(12, 28))],
             [rng.randrange(3, 60) for _ in range(rng.randint(4, 64))]) for _ in range(128)]
    model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), DistInfo(), "none")

    def step(batches):
        for ids, kw, pred, targets in batches:
            def head(hidden, weight):
                return chunked_logprob_entropy(hidden[pred], weight, targets[pred], chunk_size=1024, compiled=False)[0]
            model(ids, head=head, **kw).sum().backward()
        model.zero_grad(set_to_none=True)

    variants = {"padded, 64 sequences": [(ids, {"attention_mask": attn}, pred, tg) for ids, attn, pred, tg in
                                         (pack_sequences(seqs[i:i + 64], 0, "cpu") for i in range(0, 128, 64))]}
    for budget in (512, 1024, 4096):
        plan = plan_micro_batches([len(p) + len(r) for p, r in seqs], budget, 1)[0]
        variants[f"packed, {budget} tokens"] = [(ids, {"position_ids": pos}, pred, tg) for ids, pos, pred, tg in
                                                (pack_padding_free([seqs[i] for i in mb], "cpu") for mb in plan)]
    times = {k: [] for k in variants}
    for _ in range(repeats):                                   # interleaved, so drift hits every variant alike
        for k, b in variants.items():
            t0 = time.perf_counter()
            step(b)
            times[k].append(time.perf_counter() - t0)
    real = sum(len(p) + len(r) for p, r in seqs)
    base = min(times["padded, 64 sequences"])
    return [{"variant": k, "micro_batches": len(v), "computed_per_real": sum(ids.numel() for ids, *_ in v) / real,
             "time_ratio_to_padded": min(times[k]) / base} for k, v in variants.items()]


def main():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = [accounting(w, b) for w in (8, 16) for b in (24576, 32768, 65536)]
    print("computed tokens per real token, DAPO step at the paper's shapes (simulated lengths; no model)")
    print(f"{'W':>3} {'budget':>7} {'mean len':>8} {'padded/real':>11} {'packed/real':>11} "
          f"{'imbalance old':>13} {'new':>5} {'micro/rank old':>14} {'new':>5}")
    for r in rows:
        print(f"{r['world']:>3} {r['budget']:>7} {r['mean_len']:>8.0f} {r['padded_per_real']:>11.2f} "
              f"{r['packed_per_real']:>11.3f} {r['rank_imbalance_old']:>13.2f} {r['rank_imbalance_new']:>5.2f} "
              f"{r['micro_batches_per_rank_old']:>14.1f} {r['micro_batches_per_rank_new']:>5.1f}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t = timing(os.path.join(root, "assets", "tiny_math", "model"))
    print("\ntiny model, one forward+backward of the demo's batch (128 sequences), measured on this CPU")
    print(f"{'variant':<22} {'micro-batches':>13} {'computed/real':>13} {'time / padded':>13}")
    for r in t:
        print(f"{r['variant']:<22} {r['micro_batches']:>13} {r['computed_per_real']:>13.2f} "
              f"{r['time_ratio_to_padded']:>13.2f}")
    os.makedirs(os.path.join(root, "bench", "results"), exist_ok=True)
    out = os.path.join(root, "bench", "results", "packing.json")
    json.dump({"accounting": rows, "tiny_timing": t, "threads": torch.get_num_threads()}, open(out, "w"), indent=1)
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
