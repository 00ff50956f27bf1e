"""Token-budget micro-batches, padding-free: what a training forward/backward actually computes on.

DAPO's responses run from a few tokens to 20,480, so a fixed number of sequences per micro-batch is either
wasteful (short ones) or far over memory (long ones), and right-padding to the longest computes, stores and
attends over padding. Instead (as verl's dynamic batch size and sequence balancing, TRL's padding-free
collator do):

- `plan_micro_batches(lengths, budget, world)`: the sequences of ONE global mini-batch are dealt to the ranks
  so that each rank gets about the same number of tokens (longest first, each to the least loaded rank), and
  each rank's share is cut into micro-batches of at most `budget` tokens (a longer sequence alone). Every rank
  then runs the same number of micro-batches (FSDP/DDP collectives run per forward/backward): a rank with
  fewer runs empty ones (`None`), a two-token dummy forward whose loss is multiplied by 0. The plan is a pure
  function of the global lengths, so every rank computes the same plan without talking to the others.
- `pack_padding_free(seqs)`: the sequences of a micro-batch concatenated in ONE row [1, T] with position ids
  that restart at 0 for each sequence and no attention mask; transformers reads the restarts from
  `position_ids` and confines attention to each sequence (a block-diagonal mask under sdpa/eager, on CPU and
  in the tests; flash-attention's varlen kernel or flex_attention's block mask on GPU, see
  `attention_implementation`). Computed tokens = real tokens, and no [B, 1, T, T] padding mask.

The loss math does not depend on any of this: every loss is a sum over tokens divided by the global token
count of the mini-batch, so the partition into ranks and micro-batches changes only the order of the sums.
"""
import dataclasses

import torch


def plan_micro_batches(lengths: list[int], budget: int, world_size: int) -> list[list[list[int] | None]]:
    """Per rank, its micro-batches as lists of indices into `lengths`; `None` marks an empty micro-batch.

    lengths: tokens of each sequence of one global mini-batch (prompt + response), in a fixed order.
    budget: at most this many tokens per micro-batch (a sequence longer than that is a micro-batch alone).
    Deterministic in its inputs: ties are broken by index, so every rank derives the same plan.
    """
    if budget <= 0:
        raise ValueError(f"micro-batch token budget must be positive, got {budget}")
    # 1. deal sequences to ranks, longest first, each to the rank with the fewest tokens so far (LPT)
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], len(shares[r]), r))
        shares[r].append(i)
        load[r] += lengths[i]
    # 2. each rank's share into micro-batches of <= budget tokens: first fit, longest first
    plan = []
    for share in shares:
        bins, room = [], []
        for i in share:                                   # already longest first
            for b in range(len(bins)):
                if lengths[i] <= room[b]:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(budget - lengths[i])
        plan.append([sorted(b) for b in bins])            # stream order inside a micro-batch
    # 3. the same number of micro-batches on every rank
    n = max((len(p) for p in plan), default=0)
    return [p + [None] * (n - len(p)) for p in plan]


def pack_padding_free(seqs: list[tuple[list[int], list[int]]], device):
    """(prompt_ids, response_ids) pairs -> one packed row: input_ids [1, T], position_ids [1, T] (0.. per
    sequence), the mask of positions whose NEXT token is a response token [1, T] (the positions a loss reads),
    and targets [1, T] (the next token inside the same sequence). T = sum of the sequences' lengths.

    An empty list gives the dummy micro-batch: two tokens and one loss position, whose loss the caller multiplies
    by 0 (it still runs the whole model, so the collectives of FSDP/DDP match on every rank)."""
    seqs = seqs or [([0], [0])]
    ids, pos, pred = [], [], []
    for p, r in seqs:
        n = len(p) + len(r)
        ids += p + r
        pos += list(range(n))
        pred += [False] * (len(p) - 1) + [True] * len(r) + [False]      # the state at t predicts token t+1
    ids = torch.tensor([ids], dtype=torch.long)
    pred = torch.tensor([pred], dtype=torch.bool)
    targets = torch.roll(ids, -1, dims=1)               # read only where pred: always inside one sequence
    return (ids.to(device), torch.tensor([pos], dtype=torch.long).to(device), pred.to(device), targets.to(device))


def default_micro_batch_tokens(device_type: str) -> int:
    """--micro-batch-tokens when not given: 32768 on CUDA (bench/estimate_memory.py: Qwen3-8B's updates fit 80 GB
    with activation checkpointing), 512 on CPU, where sdpa materialises the packed row's block mask as a dense
    [T, T] tensor and attends over all of it (bench/bench_packing.py: 512 tokens 1.03x the padded step's time,
    4096 tokens 3.3x)."""
    return 32768 if device_type == "cuda" else 512


# transformers compiles flex_attention and its block mask (torch.compile, automatic dynamic shapes), and each
# of the two frames gets one variant per grad mode x one or several sequences in the row x one or several
# 128-token blocks, plus static first compiles: 10 on a run's micro-batches (tests/test_flex_attention.py),
# 13 with --rollout-engine hf generating in the same process. Past dynamo's default recompile_limit of 8 a new
# variant runs eager flex attention, which materialises B x H x T x T scores (137 GB at 32k tokens of
# Qwen3-8B): an OOM. The variants are bounded, so allow more.
FLEX_RECOMPILE_LIMIT = 64


def attention_implementation(device_type: str) -> str:
    """The attention kernel for packed rows: flash-attention's varlen kernel when the package is installed on
    CUDA, else flex_attention (block-sparse mask built from the sequence ids) on CUDA, else sdpa (CPU: the
    block-diagonal mask is materialised, fine at test sizes). Choosing flex_attention raises dynamo's
    recompile_limit to FLEX_RECOMPILE_LIMIT (see above)."""
    if device_type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2"
    except ImportError:
        import torch._dynamo
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
        return "flex_attention"


def padded_vs_packed_tokens(lengths: list[int], micro_batch_size: int, budget: int, world_size: int = 1) -> dict:
    """Computed tokens per real token of one mini-batch: right-padded micro-batches of `micro_batch_size`
    sequences in stream order (the old path) vs the packed plan above (padding only in the dummy rows)."""
    real = sum(lengths)
    padded = sum(max(lengths[i:i + micro_batch_size]) * len(lengths[i:i + micro_batch_size])
                 for i in range(0, len(lengths), micro_batch_size))
    plan = plan_micro_batches(lengths, budget, world_size)
    packed = sum(sum(lengths[i] for i in mb) if mb is not None else 2 for p in plan for mb in p)
    return {"real_tokens": real, "padded_computed": padded, "packed_computed": packed,
            "padded_ratio": padded / max(real, 1), "packed_ratio": packed / max(real, 1),
            "micro_batches_per_rank": len(plan[0]) if plan else 0}


def exchange_sequences(owner: list[int], dest: list[int], sizes: list[tuple[int, int]], local: dict, rank: int,
                       world_size: int, device=None) -> dict:
    """Move each sequence's tensors from the rank that sampled it to the rank that trains on it, and nowhere else.

    owner[i], dest[i]: ranks holding / training on sequence i; sizes[i]: (token count, log-prob count). Every
    rank passes the same three lists (agreed from small metadata). local: {i: (token_ids int64, logprobs
    float32)} for this rank's own sequences. Returns {i: (token_ids, logprobs)} on the CPU for every i with
    dest[i] == rank. Two all_to_all_single calls (ids, log-probs) whose splits follow from `sizes`, so nothing
    else is sent. `device`: where the collective runs (NCCL needs CUDA tensors, gloo CPU ones).
    """
    if world_size == 1:
        return {i: local[i] for i in range(len(owner)) if dest[i] == rank}
    import torch.distributed as dist
    send = [[i for i in range(len(owner)) if owner[i] == rank and dest[i] == d] for d in range(world_size)]
    recv = [[i for i in range(len(owner)) if owner[i] == s and dest[i] == rank] for s in range(world_size)]
    dev = device or torch.device("cpu")
    out = {}
    for k, dtype in ((0, torch.long), (1, torch.float32)):
        flat = [local[i][k].to(dtype) for d in range(world_size) for i in send[d]]
        send_buf = torch.cat(flat).to(dev) if flat else torch.empty(0, dtype=dtype, device=dev)
        in_splits = [sum(sizes[i][k] for i in send[d]) for d in range(world_size)]
        out_splits = [sum(sizes[i][k] for i in recv[s]) for s in range(world_size)]
        recv_buf = torch.empty(sum(out_splits), dtype=dtype, device=dev)
        dist.all_to_all_single(recv_buf, send_buf, out_splits, in_splits)
        recv_buf = recv_buf.cpu()
        offset = 0
        for s in range(world_size):
            for i in recv[s]:
                out.setdefault(i, [None, None])[k] = recv_buf[offset:offset + sizes[i][k]]
                offset += sizes[i][k]
    return {i: tuple(v) for i, v in out.items()}


# ----------------------------------------------------------------------------- one training step's batch

def agree_on_groups(kept: list[dict], contributes: bool) -> list[dict]:
    """Every rank's kept groups, metadata only (no "tensors"), in stream order (their "position"): the ranks
    agree on the step's batch without moving token ids. `contributes`: whether this rank's groups count (with
    vLLM tensor parallelism the ranks of one engine replica sampled the same groups; one of them speaks)."""
    from common.dist import all_gather_objects
    meta = [{k: v for k, v in g.items() if k != "tensors"} for g in kept] if contributes else []
    return sorted((g for part in all_gather_objects(meta) for g in part), key=lambda g: g["position"])


@dataclasses.dataclass
class StepBatch:
    """This rank's view of one training step's batch: sequences i = 0.. in stream order (group by group),
    `per_mini` of them per mini-batch (one optimizer step each)."""
    n_resp: list[int]                       # response tokens of every sequence of the step (all ranks)
    per_mini: int                           # sequences per mini-batch
    plan: list[list[list[int] | None]]      # plan[mb]: this rank's micro-batches of mini-batch mb (None: a dummy)
    seqs: dict                              # {i: (prompt ids, response ids)} for this rank's sequences
    sampler_logprobs: dict                  # {i: float32 [n_resp[i]]}: the rollout engine's log-probs

    @property
    def n_mini(self) -> int:
        return len(self.plan)

    def mini(self, mb: int) -> range:
        """The sequences of mini-batch mb (all ranks)."""
        return range(mb * self.per_mini, min((mb + 1) * self.per_mini, len(self.n_resp)))

    def token_offsets(self) -> list[int]:
        """offsets[i]: where sequence i's response tokens start among its mini-batch's (a global token id)."""
        out = []
        for mb in range(self.n_mini):
            total = 0
            for i in self.mini(mb):
                out.append(total)
                total += self.n_resp[i]
        return out


def build_step_batch(groups: list[dict], tensors: dict, per_mini: int, budget: int, rank: int, world_size: int,
                     device=None) -> StepBatch:
    """groups: the step's groups in stream order, each {"position", "rank" (who sampled it), "sizes": [(tokens,
    response tokens)] per sequence}; tensors: {position: [(token ids, sampler log-probs)]} for the groups this
    rank sampled (and speaks for). Plans every mini-batch's micro-batches (the same plan on every rank, from the
    lengths alone) and sends each sequence from the rank that sampled it to the rank that trains on it."""
    owner, sizes = [], []
    for g in groups:
        owner += [g["rank"]] * len(g["sizes"])
        sizes += g["sizes"]
    plan, dest = [], [0] * len(sizes)
    for lo in range(0, len(sizes), per_mini):
        every = plan_micro_batches([t for t, _ in sizes[lo:lo + per_mini]], budget, world_size)
        for r, mbs in enumerate(every):
            for j in (j for mb in mbs if mb is not None for j in mb):
                dest[lo + j] = r
        plan.append([[lo + j for j in mb] if mb is not None else None for mb in every[rank]])
    local, i = {}, 0
    for g in groups:
        for j in range(len(g["sizes"])):
            if g["position"] in tensors:
                local[i] = tensors[g["position"]][j]
            i += 1
    data = exchange_sequences(owner, dest, sizes, local, rank, world_size, device=device)
    seqs = {i: (ids[:t - r].tolist(), ids[t - r:].tolist()) for i, (ids, _) in data.items() for t, r in [sizes[i]]}
    return StepBatch(n_resp=[r for _, r in sizes], per_mini=per_mini, plan=plan, seqs=seqs,
                     sampler_logprobs={i: lps for i, (_, lps) in data.items()})


def concat(values: dict, idx: list[int], device="cpu", *, fill=None) -> torch.Tensor:
    """The per-sequence tensors values[i] of sequences idx, concatenated in that order, on `device`; for a dummy
    micro-batch (no sequences) with a `fill`, the one-element tensor [fill] (its one loss position)."""
    if not idx:
        return torch.tensor([] if fill is None else [fill], device=device)
    return torch.cat([torch.as_tensor(values[i]) for i in idx]).to(device)
