"""Process setup and sharding: the same script runs as `python x.py` on one CPU and under torchrun on GPUs.

- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the run is
  one process and no process group is created. gloo on CPU, nccl on CUDA.
- `shard_model()` wraps a causal LM for training: FSDP2 (`fully_shard` each decoder layer, then the root;
  bf16 params / fp32 gradient reduction on GPU, fp32 on CPU), DDP, or nothing.
- The root that gets wrapped is `LMWithHead`: its forward runs the decoder AND a head function the script
  passes in (the log-prob/entropy head of rl_dapo.py, the KL head of reheat_tsopsd.py). Under FSDP2 the
  root's own parameters (embeddings, final norm, lm_head) are only whole inside the root's forward, and
  calling `model.model(...)` directly mixes Tensors and DTensors; running the head inside forward keeps the
  lm_head weight gathered exactly while the loss needs it and lets autograd route its gradient back.
"""
import dataclasses
import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if launched by it; pick the device. Call before building vLLM
    (with external_launcher vLLM reuses this process group; built first, rank 1 dies in gloo)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if "RANK" not in os.environ:
        return DistInfo(device=torch.device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        # ranks wait for each other at the end of a rollout; long DAPO responses make those waits minutes long,
        # so the timeout is generous (NCCL's default is 10 minutes)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if device == "cuda" else None, timeout=datetime.timedelta(hours=2))
    return DistInfo(rank, world, local, dev)


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def derive_seed(seed: int, rank: int = 0, step: int = 0, stream: int = 0) -> int:
    """A seed for (seed, rank, step, stream), stable across runs and resumes, distinct for each tuple."""
    return int(np.random.SeedSequence([seed, rank, step, stream]).generate_state(1)[0])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce(values, op: str = "sum") -> torch.Tensor:
    """Sum/max/min of a number or list of numbers over ranks (returns a float64 CPU tensor).
    NCCL reduces only CUDA tensors; note that vLLM on CUDA creates a (1-rank) NCCL group even in a
    single-process run, so this goes through the GPU whenever the default group is NCCL."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        if "nccl" in dist.get_backend():
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.cpu()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_sharding(mode: str, info: DistInfo):
    """--sharding none under torchrun would train W independent models, each with W times its gradient."""
    if mode == "none" and info.world_size > 1:
        raise SystemExit(f"--sharding none with {info.world_size} processes: there would be no gradient sync (every rank "
                         f"would train its own model). Use --sharding fsdp or ddp, or run one process.")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def check_model_path(path: str):
    """Fail early, without downloading: a local path must be a HF checkpoint directory; anything else must look
    like a hub id (org/name)."""
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise SystemExit(f"checkpoint {path}: a directory without config.json (not a HF checkpoint)")
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.isdir(path.split("/")[0]):
        raise SystemExit(f"checkpoint not found: {path} (checkpoint directory does not exist, and it is not a hub id "
                         f"org/name)")


def resolve_model_path(path: str) -> str:
    """A local checkpoint directory as is; a hub id downloaded once (so vLLM and transformers read the same
    files). A path-looking argument that does not exist is an error, not a hub lookup."""
    check_model_path(path)
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return local
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"])


# ----------------------------------------------------------------------------- model wrapping

class LMWithHead(nn.Module):
    """The training root: decoder forward + a head computed inside forward (see module docstring).

    forward(input_ids, attention_mask, head, position_ids) returns head(hidden [B, T, H], lm_head_weight [V, H]).
    Padding-free packed micro-batches (common/batching.py) pass one row [1, T] with `position_ids` that
    restart at 0 for each sequence and no attention_mask: transformers then confines attention to each
    sequence (a block-diagonal mask with sdpa/eager, variable-length kernels with flash/flex attention).
    With tied embeddings lm_head.weight IS embed_tokens.weight (one Parameter), as in Qwen3-4B.
    """

    def __init__(self, lm: nn.Module, autocast_bf16: bool = False):
        super().__init__()
        self.lm = lm
        self.autocast_bf16 = autocast_bf16   # bf16 compute without FSDP2 (one GPU, DDP); master weights fp32

    def forward(self, input_ids, attention_mask=None, head=None, position_ids=None):
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            # use_cache=False: with a KV cache transformers skips the packed-sequence detection
            hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
        weight = self.lm.lm_head.weight
        if self.autocast_bf16:        # the chunked heads take one dtype for both (their math is fp32 inside)
            hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
        return head(hidden, weight)


def use_bf16(info: DistInfo, bf16: bool | None) -> bool:
    """The --bf16 flag resolved: as given, else on for CUDA and off for CPU."""
    return info.device.type == "cuda" if bf16 is None else bf16


def shard_model(lm: nn.Module, info: DistInfo, mode: str = "fsdp", *, bf16: bool | None = None,
                activation_checkpointing: bool | None = None, requires_grad: bool = True) -> nn.Module:
    """Wrap a HF causal LM in LMWithHead and shard it. mode: fsdp | ddp | none ("none" for one process).

    activation_checkpointing: None = on for CUDA, off for CPU. On CUDA the attention kernel is flash-attention's
    varlen one when installed, else flex_attention (common/batching.py: attention_implementation).
    bf16 (default: on for CUDA, off for CPU) keeps FSDP2's compute params in bf16 and reduces gradients
    in fp32; the master weights and optimizer state stay fp32 either way. A frozen model (the TS-OPSD
    teacher) passes requires_grad=False and is sharded the same way, so it costs 1/world of its size.
    The returned root is in training mode when requires_grad, else in eval mode.
    """
    if mode not in ("fsdp", "ddp", "none"):
        raise ValueError(f"--sharding must be fsdp, ddp or none, got {mode!r}")
    bf16 = use_bf16(info, bf16)
    if not any(p.is_meta for p in lm.parameters()):    # a meta-device model is materialised after sharding
        lm.to(info.device)
    if info.device.type == "cuda":                     # a variable-length kernel for padding-free packed rows
        from common.batching import attention_implementation
        lm.set_attn_implementation(attention_implementation("cuda"))
        print0(f"[shard_model] attention: {lm.config._attn_implementation}")
    # default: on for CUDA (bench/estimate_memory.py: Qwen3-8B at 21.5k tokens needs 175 GiB per rank without it,
    # 28 GiB with it), off on CPU, where the tiny models need no memory saving
    if activation_checkpointing if activation_checkpointing is not None else info.device.type == "cuda":
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    for p in lm.parameters():
        p.requires_grad_(requires_grad)
    fsdp = info.distributed and mode == "fsdp"
    root = LMWithHead(lm, autocast_bf16=bf16 and not fsdp)
    # training mode for a model that trains, eval for a frozen one: transformers checkpoints a decoder layer only
    # when `gradient_checkpointing and training` (modeling_layers.GradientCheckpointingLayer), and from_pretrained
    # / from_config return eval mode, so without this activation checkpointing is switched on and never runs
    # (Qwen3 has no dropout: the mode changes nothing else). tests/test_loading.py counts the recomputed layers.
    root.train(requires_grad)
    if not info.distributed or mode == "none":
        return root
    if mode == "ddp":
        if not requires_grad:
            return root                 # a frozen model needs no gradient sync: each rank keeps a full copy
        return nn.parallel.DistributedDataParallel(root, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in lm.model.layers:
        fully_shard(layer, mp_policy=mp)
    # the root's own params (embeddings, lm_head, final norm) stay gathered after forward by default, for the
    # backward that follows; a frozen model has no backward, so reshard them at once
    fully_shard(root, mp_policy=mp, reshard_after_forward=None if requires_grad else True)
    return root


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / LMWithHead (FSDP2 shards in place, so the module is the same object)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, LMWithHead):
        model = model.lm
    return model


def full_params(model: nn.Module, dtype: torch.dtype | None = None, names: set | None = None):
    """Yield (HF name, full tensor) one parameter at a time; under FSDP2 each is all-gathered just before
    it is yielded and freed after, so a weight sync never holds two full copies of the model.
    Every rank must iterate (the gathers are collectives). Tied lm_head is yielded once, as embed_tokens.
    `names`: only these parameters (the others are not gathered)."""
    lm = unwrap(model)
    seen = set()
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if names is not None and name not in names:
            continue
        t = p.detach()
        if dtype is not None:          # cast the shard, then gather: half the gather's memory for fp32 -> bf16
            t = t.to(dtype)
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        yield name, t


class LayerCalls:
    """Counts the decoder-layer forwards of a model: {"grad": run with grad outside backward, "no_grad": run
    without, "recomputed": run again INSIDE autograd's backward, which is what activation checkpointing does}.
    With checkpointing on, every grad forward is recomputed once; off (or a model in eval mode), none is. The
    tests and bench/gpu/check.sh check the scripts' own models with it. forward itself is wrapped: the
    checkpoint's recomputation runs no module hooks. `close()` restores the class's forward."""

    def __init__(self, model: nn.Module):
        self.counts = {"grad": 0, "no_grad": 0, "recomputed": 0}
        self.layers = list(unwrap(model).model.layers)
        for layer in self.layers:
            layer.forward = self._counted(layer.forward)

    def _counted(self, forward):
        def wrapper(*args, **kwargs):
            if torch._C._current_graph_task_id() != -1:
                self.counts["recomputed"] += 1
            else:
                self.counts["grad" if torch.is_grad_enabled() else "no_grad"] += 1
            return forward(*args, **kwargs)
        return wrapper

    def close(self):
        for layer in self.layers:
            del layer.forward

