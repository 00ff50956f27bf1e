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
checkpoint's embedding. The frozen TS-OPSD teacher loads the same way (requires_grad=False). In one
process, with DDP, or with --sharding none every rank needs the whole model anyway: `from_pretrained` then
`shard_model`, as before.
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
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32)
    lm.eval()                                        # as from_pretrained returns it
    _load_generation_config(lm, model_path)
    model = shard_model(lm, info, mode, **shard_kwargs)
    model.to_empty(device=info.device)
    _recompute_buffers(lm)
    _broadcast_from_rank0(model, files, info, batch_bytes)
    if info.device.type == "cuda":
        torch.cuda.empty_cache()      # the broadcast's full-size transients, so vLLM's memory probe does not count them
    return model


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
