"""Fail in the first minute, not after the first rollout: the training state made resident and one update of the
largest micro-batch run before vLLM starts.

A training step's memory peak comes in its update, after a whole rollout (at the paper's settings 1,536 prompts
x 16 samples of up to 20k tokens: an hour or more). So before vLLM is built, on every rank:

1. `materialize_optimizer_state(optimizer)`: AdamW creates its moments at its first step(); created now instead
   (zero moments, step counters back at 0, so bias correction and the first update are unchanged: tests/
   test_preflight.py), vLLM's free-memory check at start-up sees the footprint every later wake-up meets.
   Without this a fresh 8B run sees 7.6 GiB per rank (8 ranks) more free memory than it will ever have again.
2. `preflight(step, ...)`: one forward/backward of a full micro-batch through the script's own forward and loss
   (the frozen teacher's forward too in reheat), no optimizer step; the peak is measured and printed, and an OOM
   becomes a one-line error naming the flag to change. The gradients are dropped and the allocator's cache
   emptied after, so vLLM then sees the resident state only (weights, optimizer state, a teacher).

On CPU (and with --no-preflight) step 2 is skipped unless asked for (--preflight): there is no device memory to
measure, and the tests run it on CPU to check the plumbing.
"""
import time

import torch

from common.dist import print0

GIB = 2 ** 30


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state now, exactly as its first step() would, without changing anything: one step()
    with zero gradients and lr 0 (for AdamW: zero moments, parameters untouched, weight decay x lr = 0), then
    every step counter back to 0. State restored from a checkpoint is left as it is."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if all(optimizer.state.get(p) for p in params):
        return
    if any(p.grad is not None for p in params):
        raise RuntimeError("materialize_optimizer_state: call it before any backward (gradients are present)")
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.zeros_like(state["step"]) if isinstance(state["step"], torch.Tensor) else 0


def preflight_sequences(tokens: int, max_seq_len: int, prompt_len: int = 1) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) filling one packed micro-batch of `tokens` tokens with sequences of at most
    `max_seq_len` (the model's context) and the shortest prompts: nearly every position is a loss position,
    the most the chunked heads ever hold. Token id 0 throughout: memory does not depend on the ids."""
    seqs, left = [], tokens
    while left > prompt_len:
        n = min(left, max_seq_len)
        seqs.append(([0] * prompt_len, [0] * (n - prompt_len)))
        left -= n
    return seqs or [([0] * prompt_len, [0])]


def oom_hint(micro_batch_tokens: int, longest: int, activation_checkpointing: bool | None, info) -> str:
    """What to change when one micro-batch does not fit: the flags, as the scripts name them."""
    ac = activation_checkpointing if activation_checkpointing is not None else info.device.type == "cuda"
    return (f"lower --micro-batch-tokens (now {micro_batch_tokens})"
            + (f" and --max-response-len (a {longest}-token sequence runs alone)" if longest >= micro_batch_tokens else "")
            + ("" if ac else ", turn on --activation-checkpointing") + ", or shard over more GPUs")


def preflight(step, tokens: int, info, *, enabled: bool | None, name: str, hint: str) -> dict:
    """Run `step()` (one forward/backward of a `tokens`-token micro-batch, no optimizer step) and report its peak
    device memory. enabled None: on CUDA only. On an OOM: SystemExit naming `hint` (the flags to change).
    Returns {"ran", "peak_gib", "resident_gib", "free_gib", "total_gib", "seconds"} (memory on CUDA only)."""
    cuda = info.device.type == "cuda"
    if not (cuda if enabled is None else enabled):
        return {"ran": False}
    t0, before = time.time(), 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    try:
        step()
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        total = torch.cuda.get_device_properties(info.device).total_memory if cuda else 0
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        raise SystemExit(f"[{name}] preflight: out of GPU memory in one forward/backward of a {tokens}-token "
                         f"micro-batch on rank {info.rank} ({peak / GIB:.1f} of {total / GIB:.1f} GiB allocated when "
                         f"it failed; {before / GIB:.1f} GiB resident before): {hint}") from None
    out = {"ran": True, "seconds": time.time() - t0}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        out |= {"resident_gib": torch.cuda.memory_allocated() / GIB, "free_gib": free / GIB, "total_gib": total / GIB}
        print0(f"[{name}] preflight: one forward/backward of a {tokens}-token micro-batch peaked at "
               f"{out['peak_gib']:.1f} GiB of {out['total_gib']:.1f} (rank 0; {before / GIB:.1f} GiB resident: "
               f"weights and optimizer state); {out['free_gib']:.1f} GiB free for vLLM ({out['seconds']:.0f} s)")
    else:
        print0(f"[{name}] preflight: one forward/backward of a {tokens}-token micro-batch ran on {info.device} "
               f"({out['seconds']:.1f} s; memory is measured on CUDA only)")
    return out
