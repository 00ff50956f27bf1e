"""Per-rank GPU memory of each training stage at real shapes, simulated on a CPU (no GPU, no weights).

    python bench/estimate_memory.py                                   # the default sweep, Qwen3-4B and 8B, W=8
    python bench/estimate_memory.py --config 8b --stage rl --tokens 21504 --ac both --wgrad both
    python bench/estimate_memory.py --rollout                         # vLLM's budget and KV tokens per rank

How: the model is what the scripts' own `common.loading.load_sharded` returns for a shipped config.json
(assets/configs), with only the read and broadcast of the weights left out, inside a FakeTensorMode (tensors with
shapes and dtypes but no storage), over a fake process group of world W (rank 0 of W; collectives do nothing): a
meta-device `Qwen3ForCausalLM`, fp32, wrapped and sharded by `common.dist.shard_model` (FSDP2, bf16 params / fp32
reduce) with the scripts' activation-checkpointing setting, in whatever mode load_sharded leaves it (a model left
in eval mode recomputes nothing under checkpointing, and the table shows it), materialised with `to_empty`; the
reheat teacher is reheat_tsopsd.py's `frozen_copy` of it. Then one update: the stage's forward, backward and AdamW
step (fp32 master weights and moments, foreach as on CUDA). `FSDPMemTracker` attributes every allocation:
params (sharded fp32 masters + gathered bf16 copies), grads, optimizer state, activations (what forward
allocates, including recomputation under checkpointing), temporaries (what backward allocates) and the peak.
The optimizer state is created before the tracked update (a zero-gradient clip + step, tracked separately),
so the peak is that of a steady-state step, not of the first one.

Stages (one micro-batch = ONE padding-free packed row of T tokens, common/batching.pack_padding_free):
    rl       rl_dapo's update: decoder + common.losses.chunked_logprob_entropy over the response positions
    reheat   reheat_tsopsd's update: the frozen teacher (sharded, no grad) gives hidden states at the response
             positions, the teacher's lm_head is held whole in bf16 on every rank, then the student's forward
             runs common.losses.fused_linear_kl (its loss is scaled, so its backward rescales dW: one more [V, H])
    eval     evaluate.py --compare scoring: one whole model, no FSDP, no grad, the lm_head weight cloned in fp32

What is modelled rather than run (the machine has no CUDA; fake CUDA tensors abort in autograd):
- everything lives on fake *CPU* tensors; memory is counted the same way, but kernels that differ by device are
  substituted: `--attention varlen` is a memory model of the kernel the project uses on GPU (flash-attention's
  varlen kernel, or compiled flex_attention: saves q, k, v, output and a fp32 logsumexp; GQA without repeating
  K/V; no [T, T] anything). `--attention sdpa` runs transformers' real sdpa path: with a packed row it builds
  the [1, 1, T, T] bool mask, converts it to a bf16 additive mask and repeats K/V for GQA (CUDA's
  efficient-attention kernel does the same conversion); a single-sequence row needs no mask (is_causal).
- the chunked head's weight gradient: on CPU common/losses._accumulate_weight_grad rounds through a bf16
  [V, H] temporary; `--wgrad cuda` (default) simulates the CUDA branch instead (a fp32 [V, H] temporary per
  chunk, torch.mm(out_dtype=fp32) then add_), `--wgrad inplace` an in-place fp32 accumulation (no temporary).
  The `headdW` column is the memory in use at that moment (the largest over chunks): the difference between
  the two variants is the temporary, whether or not it sets the step's peak.
- the chunked heads' per-chunk softmax math: `--head compiled` (the scripts' default) allocates only what the
  compiled functions return (inductor fuses the rest); `--head eager` runs the project's eager twins on whole
  [chunk, V] blocks as on GPU.
- fake tensors have no values: fused_linear_kl's one host sync (mask.nonzero) is answered from the known
  all-true mask, its `torch.equal(grad_loss, 1)` shortcut is answered False (the scripts scale the loss), and
  transformers' packed-sequence detection is computed from the real position ids.

What still differs from the scripts (besides the kernels above and the weights never read): the update's loss around the chunked heads is a stand-in of the scripts' (rl: a clipped ratio on the
head's log-probs; reheat: fused_linear_kl's loss x 0.5), an [N]-sized fp32 computation next to the heads' [N, V]
chunks; the micro-batch is synthetic (PROMPT_TOKENS of prompt, the rest response positions); AdamW runs foreach,
as on CUDA. The scripts' --preflight (common/preflight.py) measures the real thing on a GPU at start-up.

Not counted: the CUDA context and NCCL/cuBLAS workspaces, allocator fragmentation (`--fragmentation`, 1.10),
and vLLM. vLLM shares the GPU: asleep (level 1: weights offloaded to host, KV cache freed) it keeps a residue
(CUDA graphs' pool, NCCL buffers, its own context), `--reserve-gib` (3 GiB, an assumption to check on a GPU).
A configuration fits when peak x fragmentation + reserve <= `--gpu-gib` (79.2: an 80 GB H100/A100 as torch
sees it). Writes bench/results/memory_<name>.json.
"""
import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import losses  # noqa: E402
from common.batching import pack_padding_free  # noqa: E402
from common import loading  # noqa: E402
from common.dist import DistInfo, unwrap  # noqa: E402
from common.loading import frozen_copy, load_sharded  # noqa: E402
from common.preflight import materialize_optimizer_state  # noqa: E402

GIB = 2 ** 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"4b": "assets/configs/qwen3-4b-base", "8b": "assets/configs/qwen3-8b-base"}
STAGES = ("rl", "reheat", "eval")
PROMPT_TOKENS = 1024            # of each micro-batch's first sequence; the rest are response (loss) positions
PACKED_SEQ_TOKENS = 4096        # packed rows are cut into sequences of about this length (mean DAPO ~3-5k)


# ----------------------------------------------------------------------------- setup

def load_config(spec: str, attention: str):
    """A name (4b, 8b), a directory with config.json, or a config.json path -> Qwen3Config."""
    from transformers import AutoConfig
    path = os.path.join(ROOT, CONFIGS[spec]) if spec in CONFIGS else spec
    if not os.path.exists(path):
        raise SystemExit(f"--config {spec}: not 4b, 8b, or a path to a config.json / its directory")
    cfg = AutoConfig.from_pretrained(os.path.dirname(path) if path.endswith(".json") else path)
    cfg._attn_implementation = ATTENTION[attention]
    cfg.use_cache = False
    return cfg


def fake_world(world: int) -> DistInfo:
    """Rank 0 of a fake process group of `world` ranks (collectives are no-ops that give the right shapes)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized() and dist.get_world_size() != world:
        dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return DistInfo(rank=0, world_size=world, device=torch.device("cpu"))


class _FusedAttentionCost(torch.autograd.Function):
    """The memory of a fused variable-length attention kernel (flash-attention varlen, compiled flex): forward
    writes the output and a fp32 logsumexp and saves q, k, v, out, lse; backward writes dq, dk, dv and uses a fp32
    dq accumulator. Shapes only: the values are not attention (under FakeTensorMode there are none)."""

    @staticmethod
    def forward(ctx, q, k, v):                              # [B, H, T, D], [B, KV, T, D], [B, KV, T, D]
        b, h, t, d = q.shape
        out = q.new_empty(b, t, h, d)                       # the kernel's layout [B, T, H, D]
        lse = q.new_empty(b, h, t, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq_accum = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dq = dq_accum.to(q.dtype)
        del dq_accum
        return dq, torch.empty_like(k), torch.empty_like(v)


def varlen_attention_cost(module, query, key, value, attention_mask, **kwargs):
    return _FusedAttentionCost.apply(query, key, value), None


ATTENTION = {"varlen": "sim_varlen", "sdpa": "sdpa"}


def register_attention():
    from transformers import AttentionInterface
    AttentionInterface.register("sim_varlen", varlen_attention_cost)


def make_lm(cfg, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        # fp32 as the scripts load it (from_config would otherwise follow the config's torch_dtype, bf16)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=cfg._attn_implementation, dtype=dtype)


_HEAD_DW = {"tracker": None, "max": 0}     # the memory in use while the chunked heads accumulate dW


def _probe_head_dw():
    if _HEAD_DW["tracker"] is not None:
        snap = next(iter(_HEAD_DW["tracker"].get_tracker_snapshot("current").values()))
        _HEAD_DW["max"] = max(_HEAD_DW["max"], snap["Total"])


def accumulate_cuda(grad_w, dz, h):
    """common/losses._accumulate_weight_grad's CUDA branch: mm(out_dtype=fp32) writes a [V, H] fp32 temporary."""
    tmp = torch.empty(grad_w.shape, dtype=grad_w.dtype, device=grad_w.device)
    _probe_head_dw()
    grad_w.add_(tmp)


def accumulate_inplace(grad_w, dz, h):
    """An in-place fp32 accumulation (addmm with out_dtype into grad_w): no [V, H] temporary."""
    _probe_head_dw()


WGRAD = {"cuda": accumulate_cuda, "inplace": accumulate_inplace}


# torch.compile'd per-chunk math on GPU: inductor fuses the softmax passes, so a call allocates only its outputs
# (the gradient is written into the logits buffer in place). Under FakeTensorMode nothing can be compiled, so
# the compiled functions are replaced by what they allocate.
def _logprob_entropy_chunk_cost(z, targets, inv_temp):
    return tuple(z.new_empty(z.shape[0], dtype=torch.float32) for _ in range(3))   # logprob, entropy, lse [R]


def _logprob_grad_chunk_cost_(z, targets, lse, grad_logprob, inv_temp):
    pass                                                                             # writes into z


def _distill_chunk_cost_(z_s, z_t, row_weight, inv_tau, divergence, beta, with_stats):
    stats = tuple(row_weight.new_empty(z_s.shape[0]) for _ in range(4)) if with_stats else None
    return row_weight.new_zeros(()), stats                                           # gradient written into z_s


def head_patches(head: str):
    """compiled: the functions above; eager: the project's eager math, on whole chunks as on GPU (on CPU
    common/losses runs it on cache-sized row blocks, which would under-count the GPU's [chunk, V] temporaries)."""
    if head == "eager":
        return [mock.patch.object(losses, "_row_block", lambda chunk_size, vocab, device: chunk_size)]
    return [mock.patch.object(losses, "_logprob_entropy_chunk_compiled", _logprob_entropy_chunk_cost),
            mock.patch.object(losses, "_logprob_grad_chunk_compiled", _logprob_grad_chunk_cost_),
            mock.patch.object(losses, "_distill_chunk_compiled", _distill_chunk_cost_)]


def micro_batch(tokens: int, packing: str):
    """A packed row of `tokens` tokens: one sequence (prompt + response) or several of ~PACKED_SEQ_TOKENS."""
    n_seq = 1 if packing == "single" else max(1, round(tokens / PACKED_SEQ_TOKENS))
    lengths = [tokens // n_seq + (i < tokens % n_seq) for i in range(n_seq)]
    prompt = min(PROMPT_TOKENS, tokens // (2 * n_seq))
    seqs = [([1] * prompt, [2] * (n - prompt)) for n in lengths]
    return pack_padding_free(seqs, "cpu")


@contextlib.contextmanager
def checkpoint_not_read(fake):
    """load_sharded / frozen_copy without a checkpoint: no safetensors to list, no weights to read and broadcast
    (fake tensors hold no values), and the models materialised (`to_empty`) as fake tensors; everything else they
    do runs (FSDP's device mesh cannot be set up inside a FakeTensorMode, so only to_empty enters it)."""
    real_to_empty = torch.nn.Module.to_empty

    def to_empty_fake(self, *, device, recurse=True):
        with fake:
            return real_to_empty(self, device=device, recurse=recurse)
    with mock.patch.object(loading, "checkpoint_files", lambda path: []), \
            mock.patch.object(loading, "_broadcast_from_rank0", lambda *args: None), \
            mock.patch.object(torch.nn.Module, "to_empty", to_empty_fake):
        yield


@contextlib.contextmanager
def simulation_patches(position_ids, wgrad: str, head: str):
    """What fake tensors cannot answer, answered (see the module docstring)."""
    import transformers.masking_utils as mu
    seq_ids = mu.find_packed_sequence_indices(position_ids)        # real values: None for a single sequence
    from torch._subclasses.fake_tensor import FakeTensor
    orig_nonzero, orig_equal = torch.Tensor.nonzero, torch.equal

    def nonzero(self, *a, **kw):
        if hasattr(self, "_sim_nonzero"):
            return self._sim_nonzero
        return orig_nonzero(self, *a, **kw)

    def equal(a, b):
        return False if isinstance(a, FakeTensor) else orig_equal(a, b)

    with contextlib.ExitStack() as stack:
        for patch in [mock.patch.object(mu, "find_packed_sequence_indices", lambda pos: seq_ids),
                      mock.patch.object(torch.Tensor, "nonzero", nonzero), mock.patch.object(torch, "equal", equal),
                      mock.patch.object(losses, "_accumulate_weight_grad", WGRAD[wgrad]), *head_patches(head)]:
            stack.enter_context(patch)
        yield


# ----------------------------------------------------------------------------- one simulated update

def _breakdown(snap: dict) -> dict:
    """FSDPMemTracker's categories at the peak, in the table's columns (bytes)."""
    s = {str(getattr(k, "value", k)): v for k, v in next(iter(snap.values())).items()}
    get = lambda *names: sum(s.get(n, 0) for n in names)  # noqa: E731
    return {"params": get("Sharded Param", "Unsharded Param", "Buffer", "All Gather", "Parameter", "Other"),
            "grads": get("Sharded Grad", "Unsharded Grad", "Reduce Scatter", "Gradient"),
            "optim": get("OptState", "Optstate"),
            "activations": get("Activation", "Inputs", "Input"),
            "temps": get("Temp"),
            "peak": s.get("Total", 0)}   # the categories are those at the moment of the peak


def simulate(cfg, stage: str, world: int, tokens: int, ac: bool, *, packing: str = "packed", wgrad: str = "cuda",
             head: str = "compiled", chunk_size: int = 1024, eval_dtype: str = "bf16") -> dict:
    """Per-rank memory (bytes) of one update of `stage` on one micro-batch of `tokens` tokens."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    ids_r, pos_r, pred_r, _ = micro_batch(tokens, packing)
    n_resp = int(pred_r.sum())
    V, H = cfg.vocab_size, cfg.hidden_size
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    compiled = head == "compiled"
    with simulation_patches(pos_r, wgrad, head):
        if stage == "eval":
            dtype = torch.bfloat16 if eval_dtype == "bf16" else torch.float32
            lm = make_lm(cfg, dtype)                # built in its dtype: a cast of fake parameters cannot swap them
            with fake:
                lm = lm.to_empty(device="cpu").eval()   # requires_grad kept: MemTracker hooks need it
                ids, pos = torch.zeros(1, tokens, dtype=torch.long), torch.zeros(1, tokens, dtype=torch.long)
                keep = torch.zeros(n_resp, dtype=torch.long)
                tracker = MemTracker()
                tracker.track_external(lm)
                with tracker, torch.no_grad():
                    # evaluate.score_sequences: hooks keep each layer's output at the scored positions (moved to
                    # the host there; here they stay, a few MB), the final ones in fp32, the lm_head in fp32
                    kept = []
                    hooks = [m.register_forward_hook(lambda mod, inp, out: kept.append(
                        (out[0] if isinstance(out, tuple) else out)[0].index_select(0, keep)))
                        for m in [lm.model.embed_tokens, *lm.model.layers, lm.model.norm]]
                    lm.model(input_ids=ids, position_ids=pos)
                    final = kept[-1].float()
                    weight = lm.get_output_embeddings().weight.detach().float().clone()
                    for hk in hooks:
                        hk.remove()
                    del final, weight
                snap = tracker.get_tracker_snapshot("peak")
            return _breakdown(snap)

        info = fake_world(world)
        with tempfile.TemporaryDirectory() as tmp, checkpoint_not_read(fake):
            # the scripts' own calls: load_sharded (build on meta, shard, to_empty, buffers; only the read and
            # broadcast of the weights left out) and, for reheat, frozen_copy of the student. Whatever mode or
            # checkpointing setting they leave the model in is what runs here: a model left in eval mode would
            # recompute no layer and show as such (rl 8B, 21,504 tokens: 175 GiB instead of 28)
            cfg.to_json_file(os.path.join(tmp, "config.json"))
            model = load_sharded(tmp, info, "fsdp", bf16=True, activation_checkpointing=ac)
            teacher = frozen_copy(model, info, "fsdp", bf16=True) if stage == "reheat" else None
        for m in (model, teacher):
            if m is not None:              # the kernel's cost model, where shard_model picks flex/flash on CUDA
                unwrap(m).set_attn_implementation(cfg._attn_implementation)
        with fake:
            if teacher is not None:
                teacher_weight = torch.empty(V, H, dtype=torch.bfloat16)      # gathered once, whole, bf16
            ids, pos = torch.zeros(1, tokens, dtype=torch.long), torch.zeros(1, tokens, dtype=torch.long)
            resp = torch.zeros(n_resp, dtype=torch.long)                      # response positions of the row
            targets = torch.zeros(n_resp, dtype=torch.long)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

            def rl_head(hidden, weight):
                # rl_dapo's logprob_head at T=1 and its clipped token-mean loss ([N] fp32 math: negligible)
                h = hidden[0].index_select(0, resp)                           # [N, H]
                logp, ent = losses.chunked_logprob_entropy(h, weight, targets, chunk_size=chunk_size, compiled=compiled)
                ratio = (logp - logp.detach()).exp()
                return -(ratio.clamp(0.8, 1.28) * 0.5).sum() / n_resp

            def kl_head(t_hidden):
                def head(hidden, weight):
                    h = hidden[0].index_select(0, resp)                       # [N, H]
                    mask = torch.ones(n_resp, dtype=torch.bool)
                    mask._sim_nonzero = torch.zeros(n_resp, 1, dtype=torch.long)
                    loss, _ = losses.fused_linear_kl(h, weight, t_hidden.to(h.dtype), teacher_weight, mask, tau=1.5,
                                                     chunk_size=chunk_size, compiled=compiled, return_stats=True)
                    return loss * 0.5                     # the scripts re-weight each micro-batch's mean
                return head

            tracker = FSDPMemTracker(model, optimizer)
            if teacher is not None:
                # FSDP's lazy init (first forward) replaces the sharded storages: run it on one token first, or
                # the teacher's shards would be tracked under their old, freed storages and counted nowhere
                with torch.no_grad():
                    teacher(ids[:, :1], head=lambda h, w: h.sum(), position_ids=pos[:, :1])
                # FSDPMemTracker follows one root and its track_external is a no-op: file the teacher's shards
                # and its whole head by hand, as sharded and unsharded params
                from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
                for p in teacher.parameters():
                    tracker._update_and_maybe_create_winfos(p, _FSDPRefType.SHARDED_PARAM)
                tracker._update_and_maybe_create_winfos(teacher_weight, _FSDPRefType.UNSHARDED_PARAM)
            tracker.track_inputs((ids, pos))
            with tracker:
                # Steady state: the moments exist before the update. A separate entry (each entry restarts the
                # peak), because the first DTensor op of each kind runs sharding propagation, which here runs
                # under the simulation's own fake mode and is counted (several x the sharded model; cached after)
                # (the scripts' common/preflight.materialize_optimizer_state, then a clip of zero gradients for the
                # clip's own sharding propagation)
                materialize_optimizer_state(optimizer)
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.zero_grad(set_to_none=True)
            _HEAD_DW.update(tracker=tracker, max=0)
            with tracker:
                if teacher is None:
                    loss = model(ids, head=rl_head, position_ids=pos)
                else:
                    with torch.no_grad():
                        t_h = teacher(ids, head=lambda h, w: h[0].index_select(0, resp).clone(), position_ids=pos)
                    loss = model(ids, head=kl_head(t_h), position_ids=pos)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
            _HEAD_DW["tracker"] = None
            snap = tracker.get_tracker_snapshot("peak")
        return {**_breakdown(snap), "head_dw": _HEAD_DW["max"]}


# ----------------------------------------------------------------------------- vLLM's share during rollout

OLD_DEFAULTS = {"rl": 0.5, "reheat": 0.4}      # the fixed --vllm-gpu-memory defaults before the budget was measured


def rollout_budget(cfg, stage: str, world: int, gpu_gib: float, context_gib: float, overhead_gib: float,
                   utilization: float | None = None) -> dict:
    """Per rank, what vLLM gets during rollout (GiB; computed from the parameter count, not simulated). Resident
    training state when the engine starts: fp32 shards and AdamW's two fp32 moments (common/preflight.py creates
    them first), and for reheat the frozen teacher's fp32 shards and its gathered bf16 head; gradients and
    activations are gone. utilization None: the scripts' default, free less common.rollout.VLLM_MARGIN_GIB.
    Out of vLLM's budget come its bf16 weights (the whole model on every rank at --vllm-tp 1), `overhead_gib` of
    activations and CUDA graphs (an assumption), and the KV cache: 2 (K, V) x layers x kv heads x head_dim x 2
    bytes per token."""
    from common.rollout import VLLM_MARGIN_GIB
    lm = make_lm(cfg)
    n = sum(p.numel() for p in lm.parameters())                       # a tied head counted once
    head = lm.get_output_embeddings().weight.numel()
    resident = n * (4 + 8) / world + ((n * 4 / world + head * 2) if stage == "reheat" else 0)
    resident /= GIB
    free = gpu_gib - context_gib - resident
    util = (free - VLLM_MARGIN_GIB) / gpu_gib if utilization is None else utilization
    weights = n * 2 / GIB
    kv = util * gpu_gib - weights - overhead_gib
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    return {"params": n, "resident_gib": resident, "free_gib": free, "utilization": util,
            "budget_gib": util * gpu_gib, "vllm_weights_gib": weights, "kv_gib": kv,
            "kv_bytes_per_token": per_token, "kv_tokens": max(kv, 0) * GIB / per_token}


def rollout_table(a):
    rows = []
    print(f"{'stage':6} {'config':6} {'W':>2} {'budget':>8} {'resident':>8} {'free':>6} {'util':>5} {'vLLM':>6} "
          f"{'weights':>7} {'KV GiB':>6} {'KV tokens':>9}  (GiB per rank, {a.gpu_gib} GiB card)")
    for spec, stage in itertools.product(a.config, [s for s in a.stage if s != "eval"]):
        cfg = load_config(spec, "sdpa")                 # (the kernel does not matter here)
        for name, util in (("default", None), (f"old {OLD_DEFAULTS[stage]}", OLD_DEFAULTS[stage])):
            r = rollout_budget(cfg, stage, a.world, a.gpu_gib, a.context_gib, a.vllm_overhead_gib, util)
            rows.append({"stage": stage, "config": spec, "world": a.world, "budget": name, **r})
            print(f"{stage:6} {os.path.basename(spec.rstrip('/')):6} {a.world:>2} {name:>8} {r['resident_gib']:8.2f} "
                  f"{r['free_gib']:6.1f} {r['utilization']:5.3f} {r['budget_gib']:6.1f} {r['vllm_weights_gib']:7.2f} "
                  f"{r['kv_gib']:6.1f} {r['kv_tokens'] / 1e3:8.0f}k", flush=True)
    out = a.json or os.path.join(ROOT, "bench", "results", "vllm_budget.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"assumptions": {"gpu_gib": a.gpu_gib, "context_gib": a.context_gib,
                                   "vllm_overhead_gib": a.vllm_overhead_gib}, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- sweep

def fits(peak: float, a) -> bool:
    return peak * a.fragmentation + a.reserve_gib * GIB <= a.gpu_gib * GIB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["4b", "8b"], help="4b, 8b, or paths to a config.json")
    p.add_argument("--world", type=int, default=8, help="FSDP ranks (GPUs)")
    p.add_argument("--stage", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 21504],
                   help="tokens per micro-batch (--micro-batch-tokens); 21504 = 20,480-token response + 1,024 prompt")
    p.add_argument("--ac", choices=("on", "off", "both"), default="both", help="activation checkpointing")
    p.add_argument("--attention", choices=("varlen", "sdpa", "both"), default="varlen",
                   help="varlen: the GPU kernel's memory (flash varlen / flex); sdpa: transformers' sdpa path")
    p.add_argument("--packing", choices=("single", "packed", "both"), default="packed",
                   help="one sequence per row, or sequences of ~4k packed (only sdpa builds a mask for the latter)")
    p.add_argument("--wgrad", choices=("cuda", "inplace", "both"), default="cuda",
                   help="chunked head's dW accumulation: the CUDA branch (fp32 [V, H] temporary) or in place")
    p.add_argument("--head", choices=("compiled", "eager", "both"), default="compiled",
                   help="the chunked heads' per-chunk math: torch.compile'd (the scripts' --compile default) or eager")
    p.add_argument("--chunk-size", type=int, default=1024, help="the scripts' --chunk-size")
    p.add_argument("--eval-dtype", choices=("bf16", "fp32"), default="bf16",
                   help="evaluate.py's model dtype (bf16 on CUDA)")
    p.add_argument("--gpu-gib", type=float, default=79.2, help="usable GPU memory (80 GB H100/A100: 79.2 GiB)")
    p.add_argument("--reserve-gib", type=float, default=3.0, help="vLLM's sleeping residue + CUDA context")
    p.add_argument("--fragmentation", type=float, default=1.10, help="allocator overhead factor on the peak")
    p.add_argument("--rollout", action="store_true",
                   help="instead of the update: vLLM's budget and KV cache per rank during rollout at the scripts' "
                        "default --vllm-gpu-memory and the old fixed ones (computed; bench/results/vllm_budget.json)")
    p.add_argument("--context-gib", type=float, default=1.0,
                   help="--rollout: CUDA context, NCCL and cuBLAS workspaces outside torch's allocator (assumption)")
    p.add_argument("--vllm-overhead-gib", type=float, default=3.0,
                   help="--rollout: vLLM's activation peak and CUDA graphs inside its budget (assumption)")
    p.add_argument("--json", default="", help="output path (default bench/results/memory_<configs>.json)")
    a = p.parse_args(argv)
    if a.world < 1 or any(t < 2 for t in a.tokens):
        raise SystemExit("--world must be >= 1 and every --tokens >= 2")
    if a.rollout:
        return rollout_table(a)
    both = lambda x, vals: vals if x == "both" else [x]  # noqa: E731
    register_attention()
    rows = []
    hdr = (f"{'stage':6} {'config':6} {'W':>2} {'tokens':>6} {'AC':3} {'attn':6} {'pack':6} {'head':8} {'dW':7} "
           f"{'params':>6} {'grads':>6} {'optim':>6} {'activ':>6} {'temps':>6} {'peak':>6} {'headdW':>6}  fits 80 GB")
    print(hdr + "\n" + "-" * len(hdr), flush=True)
    for spec, stage, attn, tokens in itertools.product(a.config, a.stage, both(a.attention, ["varlen", "sdpa"]),
                                                       a.tokens):
        cfg = load_config(spec, attn)
        train = stage != "eval"
        for packing, ac, head, wgrad in itertools.product(
                both(a.packing, ["single", "packed"]) if attn == "sdpa" else ["packed"],
                [x == "on" for x in both(a.ac, ["off", "on"])] if train else [False],
                both(a.head, ["compiled", "eager"]) if train else ["-"],
                both(a.wgrad, ["cuda", "inplace"]) if train else ["-"]):
            t0 = time.time()
            r = simulate(cfg, stage, a.world, tokens, ac, packing=packing, wgrad=wgrad if train else "cuda",
                         head=head if train else "compiled", chunk_size=a.chunk_size, eval_dtype=a.eval_dtype)
            g = {k: v / GIB for k, v in r.items()}
            row = {"stage": stage, "config": spec, "world": a.world if train else 1, "tokens": tokens,
                   "activation_checkpointing": ac, "attention": attn, "packing": packing, "head": head,
                   "wgrad": wgrad, **{k + "_gib": round(v, 3) for k, v in g.items()},
                   "fits_80gb": fits(r["peak"], a), "sim_seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(f"{stage:6} {os.path.basename(spec.rstrip('/')):6} {row['world']:>2} {tokens:>6} "
                  f"{'on' if ac else 'off':3} {attn:6} {packing:6} {head:8} {wgrad:7} {g['params']:6.2f} "
                  f"{g['grads']:6.2f} {g['optim']:6.2f} {g['activations']:6.2f} {g['temps']:6.2f} {g['peak']:6.2f} "
                  f"{g.get('head_dw', 0):6.2f}  "
                  f"{'yes' if row['fits_80gb'] else 'NO'}", flush=True)
    out = a.json or os.path.join(ROOT, "bench", "results",
                                 f"memory_{'_'.join(os.path.basename(c.rstrip('/')) for c in a.config)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"assumptions": {"gpu_gib": a.gpu_gib, "reserve_gib": a.reserve_gib,
                                   "fragmentation": a.fragmentation, "chunk_size": a.chunk_size,
                                   "prompt_tokens": PROMPT_TOKENS, "packed_seq_tokens": PACKED_SEQ_TOKENS,
                                   "eval_dtype": a.eval_dtype, "torch": torch.__version__},
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
