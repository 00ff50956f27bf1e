"""Loading a checkpoint straight into its FSDP2 shards: no GPU ever holds the whole model, and only rank 0
reads the checkpoint into host RAM, one batch of tensors at a time.

`load_sharded(path, info, mode, ...)` returns what `common.dist.shard_model` returns. With several processes
and mode "fsdp":
1. every rank builds the model on the meta device from config.json (no memory) and shards it;
2. `to_empty` allocates each rank's fp32 shards, uninitialised, on its device;
3. rank 0 alone reads the safetensors, a batch of at most `batch_bytes` at a time in the stored dtype, and
   broadcasts them with `set_model_state_dict(broadcast_from_rank0=True)`: torch broadcasts one tensor at a
   time, and every rank copies its slice into its shard (bf16 -> fp32 in that copy), so a rank other than 0
   holds its shards plus one full tensor, never the model;
4. the non-persistent buffers (the rotary `inv_freq`), which no checkpoint holds, are recomputed.
With tied embeddings (Qwen3-4B) lm_head.weight is embed_tokens.weight, one shard, loaded once from the
checkpoint's embedding. In one process, with DDP, or with --sharding none every rank needs the whole model
anyway: `from_pretrained` then `shard_model`, as before. Either way the model comes back in training mode (eval
when requires_grad=False), which is what makes activation checkpointing run.

`build_model(config, ...)` is step 1 alone (the estimator's model), and `frozen_copy(model, ...)` the frozen
TS-OPSD teacher built the same way and filled from the student's own shards, not from a second read.
"""
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from common.dist import DistInfo, shard_model, unwrap


def load_sharded(model_path: str, info: DistInfo, mode: str = "fsdp", *, bf16: bool | None = None,
                 activation_checkpointing: bool | None = None, requires_grad: bool = True,
                 batch_bytes: int = 1 << 30) -> nn.Module:
    """The fp32 model at `model_path` (a local HF checkpoint directory), wrapped and sharded by shard_model
    with these arguments. A frozen model (the TS-OPSD teacher) passes requires_grad=False."""
    from transformers import AutoConfig, AutoModelForCausalLM
    shard_kwargs = dict(bf16=bf16, activation_checkpointing=activation_checkpointing, requires_grad=requires_grad)
    if not (info.distributed and mode == "fsdp"):
        lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        return shard_model(lm, info, mode, **shard_kwargs)
    files = checkpoint_files(model_path)             # fail on every rank, before any collective
    model = build_model(AutoConfig.from_pretrained(model_path), info, mode, **shard_kwargs)
    lm = unwrap(model)
    _load_generation_config(lm, model_path)
    model.to_empty(device=info.device)
    _recompute_buffers(lm)
    _broadcast_from_rank0(model, files, info, batch_bytes)
    if info.device.type == "cuda":
        torch.cuda.empty_cache()      # the broadcast's full-size transients, so vLLM's memory probe does not count them
    return model


def build_model(config, info: DistInfo, mode: str = "fsdp", *, bf16: bool | None = None,
                activation_checkpointing: bool | None = None, requires_grad: bool = True) -> nn.Module:
    """The scripts' model from a config, on the meta device (no memory): fp32, wrapped and sharded by
    shard_model with these arguments (training mode when requires_grad, else eval). load_sharded fills it from a
    checkpoint; bench/estimate_memory.py runs it under fake tensors, so the simulation is of this very object."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return shard_model(lm, info, mode, bf16=bf16, activation_checkpointing=activation_checkpointing,
                       requires_grad=requires_grad)


@torch.no_grad()
def frozen_copy(model: nn.Module, info: DistInfo, mode: str = "fsdp", *, bf16: bool | None = None) -> nn.Module:
    """A frozen copy (no grad, eval mode) of a loaded model, wrapped and sharded as build_model(requires_grad=False)
    does, filled from this rank's own shards of `model` (device to device): the TS-OPSD teacher without a second
    read and broadcast of the checkpoint (32.8 GB at Qwen3-8B). Same names, shapes and shardings on both sides,
    so every rank copies its local shard; buffers (the rotary inv_freq) are copied too."""
    src = unwrap(model)
    copy = build_model(src.config, info, mode, bf16=bf16, requires_grad=False)
    copy.to_empty(device=info.device)
    dst = unwrap(copy)
    if src.get_output_embeddings().weight is src.get_input_embeddings().weight:
        dst.get_output_embeddings().weight = dst.get_input_embeddings().weight   # a plain to_empty unties them
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (a DTensor's own shard)
    source = dict(src.named_parameters()) | dict(src.named_buffers())
    targets = list(dst.named_parameters()) + list(dst.named_buffers())
    if {n for n, _ in targets} != set(source):
        raise RuntimeError(f"frozen_copy: the copy's tensors differ from the model's: "
                           f"{sorted({n for n, _ in targets} ^ set(source))[:5]}")
    for name, t in targets:
        local(t).copy_(local(source[name]))
    dst.generation_config = src.generation_config
    return copy


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The scripts' optimizer: AdamW over the root's (fp32 master, possibly sharded) parameters, betas (0.9, 0.999)
    as verl's and the paper's."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def param_count(model_path: str) -> int:
    """Parameters of the checkpoint's model (a tied head once), from its config alone: a meta-device build, no
    weights read (for the disk check before loading)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from common.checkpoint import count_params
    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path)))


def checkpoint_files(model_path: str) -> list[str]:
    """The checkpoint's safetensors files, in the index's order when it has one."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors"))
    if not names:
        raise SystemExit(f"checkpoint {model_path}: no *.safetensors files (FSDP loading reads only safetensors; "
                         f"re-save it with save_pretrained, or use --sharding ddp)")
    return [os.path.join(model_path, n) for n in names]


def _load_generation_config(lm: nn.Module, model_path: str):
    # from_pretrained reads generation_config.json (Qwen3's two stop tokens); the HF rollout engine uses it
    if os.path.isfile(os.path.join(model_path, "generation_config.json")):
        from transformers import GenerationConfig
        lm.generation_config = GenerationConfig.from_pretrained(model_path)


@torch.no_grad()
def _recompute_buffers(lm: nn.Module):
    """to_empty left the non-persistent buffers uninitialised; rebuild each module that owns one (the rotary
    embedding, built from the config alone) on the CPU and copy its buffers over."""
    for name, module in lm.named_modules():
        buffers = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None]
        if not buffers:
            continue
        if not hasattr(module, "config"):
            raise SystemExit(f"load_sharded: cannot recompute the buffers {buffers} of {name or 'the model'} "
                             f"({type(module).__name__} is not built from a config); use --sharding ddp")
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        for b in buffers:
            getattr(module, b).copy_(getattr(fresh, b))


def _broadcast_from_rank0(model: nn.Module, files: list[str], info: DistInfo, batch_bytes: int):
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    lm = unwrap(model)
    prefix = "lm."                                   # the root is LMWithHead: the HF names sit under .lm
    error = None
    if info.is_main:
        stored = set()
        for path in files:
            with safe_open(path, framework="pt") as f:
                stored |= {prefix + k for k in f.keys()}
        wanted = set(model.state_dict())
        optional = {prefix + "lm_head.weight"} if lm.config.tie_word_embeddings else set()
        missing, unexpected = sorted(wanted - stored - optional), sorted(stored - wanted)
        if missing or unexpected:
            missing, unexpected = [k[len(prefix):] for k in missing], [k[len(prefix):] for k in unexpected]
            error = (f"checkpoint {os.path.dirname(files[0])} does not match its config.json: missing "
                     f"{missing[:5]}, unexpected {unexpected[:5]}")
    error = _from_rank0(error)
    if error:
        raise SystemExit(f"load_sharded: {error}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    batches = _batches(files, prefix, batch_bytes) if info.is_main else None
    while True:                                      # one collective round per batch; rank 0 says when to stop
        batch = next(batches, None) if info.is_main else None
        if not _from_rank0(batch is not None):
            break
        set_model_state_dict(model, batch or {}, options=options)
        del batch


def _batches(files: list[str], prefix: str, batch_bytes: int):
    """{prefixed name: tensor} of at most batch_bytes each (a larger tensor alone), in the stored dtype."""
    from safetensors import safe_open
    batch, size = {}, 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if batch and size + t.nbytes > batch_bytes:
                    yield batch
                    batch, size = {}, 0
                batch[prefix + key] = t
                size += t.nbytes
    if batch:
        yield batch


def _from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
