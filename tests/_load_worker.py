"""torchrun worker for tests/test_loading.py: sharded loading under FSDP2 on gloo, measured.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/_load_worker.py MODEL_DIR OUT_DIR [--old]

Each rank measures its peak RSS growth over the load (VmHWM, reset just before), then checks: the gathered
full state dict equals the checkpoint's tensors exactly (as fp32), tied weights stay one Parameter, the
sharded forward equals a plain from_pretrained model's logits, and a frozen (requires_grad=False) copy loads
the same, its head gathered once by full_params as reheat_tsopsd.py does (common/loading.frozen_copy of the
student's shards, as the script builds it). `--old` loads the way the scripts
did before common/loading.py (from_pretrained on every rank, then shard_model) and measures only.
Each rank writes OUT_DIR/result_rank{r}.json.
"""
import json
import os
import resource
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.dist import full_params, init_distributed, shard_model, unwrap  # noqa: E402
from common.loading import checkpoint_files, frozen_copy, load_sharded  # noqa: E402


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    try:                                      # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM
    model_dir, out_dir, old = sys.argv[1], sys.argv[2], "--old" in sys.argv[3:]
    info = init_distributed("cpu")
    res = {"rank": info.rank}
    dist.barrier()
    before = status_kib("VmRSS")
    exact_peak = reset_peak_rss()
    if old:
        model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), info, "fsdp",
                            bf16=False)
    else:
        model = load_sharded(model_dir, info, "fsdp", bf16=False, activation_checkpointing=True,
                             batch_bytes=64 << 20)    # several broadcast rounds; the teacher below takes one
    peak = status_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lm = unwrap(model)
    params = list(lm.parameters())            # unique: a tied head is counted once
    res["growth_bytes"] = (peak - before) * 1024
    res["shard_bytes"] = sum(p.to_local().nbytes for p in params)
    res["model_bytes"] = sum(p.numel() * 4 for p in params)
    dist.barrier()
    if old:
        return res

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ids = torch.randint(0, lm.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, head=lambda h, w: h @ w.T)
    model(ids, head=lambda h, w: (h @ w.T).logsumexp(-1).mean()).backward()     # in the mode load_sharded left
    grads = {name: p.grad.full_tensor() for name, p in lm.named_parameters()}   # collectives: every rank
    teacher = frozen_copy(model, info, "fsdp", bf16=False)        # reheat_tsopsd.py's teacher: the student's shards
    tied = lm.config.tie_word_embeddings
    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    teacher_head = next(t for _, t in full_params(teacher, names={head_name}))
    with torch.no_grad():
        teacher_logits = teacher(ids, head=lambda h, w: h @ w.T)
    res["trainable"] = all(p.requires_grad and p.dtype == torch.float32 for p in params)
    res["teacher_frozen"] = not any(p.requires_grad for p in unwrap(teacher).parameters()) and not teacher.training
    res["training_mode"] = model.training and all(layer.training for layer in lm.model.layers)
    res["tied_is_one_param"] = (lm.lm_head.weight is lm.model.embed_tokens.weight) == tied
    res["checkpointing"] = lm.is_gradient_checkpointing
    if info.is_main:
        ckpt = {}
        for path in checkpoint_files(model_dir):
            ckpt.update(load_file(path))
        want = {"lm." + k: v.float() for k, v in ckpt.items()}
        if tied:
            want["lm.lm_head.weight"] = want["lm.model.embed_tokens.weight"]
        res["state_dict_exact"] = sd.keys() == want.keys() and all(
            sd[k].dtype == torch.float32 and torch.equal(sd[k], want[k]) for k in want)
        res["teacher_head_exact"] = torch.equal(teacher_head, want["lm." + head_name])
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            ref = plain(ids).logits
        res["logits_max_diff"] = (logits - ref).abs().max().item()
        plain(ids).logits.logsumexp(-1).mean().backward()
        plain_grads = {name: p.grad for name, p in plain.named_parameters()}
        res["grads_max_diff"] = max((grads[k] - plain_grads[k]).abs().max().item() for k in plain_grads)
        res["grads_same_names"] = grads.keys() == plain_grads.keys()
        res["teacher_logits_max_diff"] = (teacher_logits - ref).abs().max().item()
        res["rotary_exact"] = all(torch.equal(getattr(lm.model.rotary_emb, b), getattr(plain.model.rotary_emb, b))
                                  for b in ("inv_freq", "original_inv_freq"))
        plain.config.use_cache = False        # as shard_model sets it
        res["configs_equal"] = (lm.config.to_dict() == plain.config.to_dict()
                                and lm.generation_config.to_dict() == plain.generation_config.to_dict())
    return res


if __name__ == "__main__":
    result = main()
    with open(os.path.join(sys.argv[2], f"result_rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
