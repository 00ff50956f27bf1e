"""torchrun worker for tests/test_checkpoint.py: checkpoint round trips under FSDP2 and DDP on gloo.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/_ckpt_worker.py MODEL_DIR OUT_DIR

- fsdp: `fully_shard` each layer, then a root that holds the HF model as `.lm` (as common/dist.py's
  LMWithHead does, so names carry an "lm." prefix); train 2 steps, save, load into a fresh sharded
  model and optimizer: this rank's parameter and optimizer shards and its RNG draws must be equal.
  Rank 0 loads the HF dir in plain transformers: same logits as the sharded model, lm_head not written.
- ddp: the same with DDP around the bare HF model.
- cross: the fsdp checkpoint into a fresh DDP model: the full weights and optimizer state must equal the
  FSDP2 run's gathered ones (checkpoints are keyed by HF names, DCP reshards).
- run_dir: make_run_dir gives every rank rank 0's path; save_checkpoint copies its config.json in.

Each rank writes OUT_DIR/result_rank{r}.json ({check: bool}); the exit code is 1 if any check failed.
"""
import json
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from common.runlog import make_run_dir  # noqa: E402


class Root(nn.Module):
    """A training root around the HF model, like LMWithHead: its names are "lm.<HF name>"."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs):
        return self.lm(**kwargs)


def build(model_dir, mode):
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if mode == "fsdp":
        model = Root(lm)
        for layer in lm.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(lm)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, opt, rank):
    g = torch.Generator().manual_seed(rank)   # different data per rank, as in training
    for _ in range(2):
        ids = torch.randint(0, 300, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def draws():
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def full_state(model, opt):
    """Gathered weights and optimizer state on every rank, names without the wrapper's "lm." prefix."""
    opts = StateDictOptions(full_state_dict=True)
    strip = lambda d: {k.removeprefix("lm."): v for k, v in d.items()}  # noqa: E731
    optim = get_optimizer_state_dict(model, opt, options=opts)["state"]
    return strip(get_model_state_dict(model, options=opts)), strip(optim)


def same_shards(model, opt, fresh, fresh_opt):
    params = all(torch.equal(local(a), local(b)) for a, b in zip(model.parameters(), fresh.parameters()))
    s0, s1 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    optim = s0.keys() == s1.keys() and all(
        torch.equal(local(s0[k][n]), local(s1[k][n])) for k in s0 for n in ("exp_avg", "exp_avg_sq", "step"))
    return params, optim


def main():
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    checks = {}

    run_dir = make_run_dir(out_dir, "worker", {"seed": 5, "lr": 1e-2}, rank=rank)
    paths = [None, None]
    dist.all_gather_object(paths, run_dir)
    checks["run_dir_same_on_ranks"] = paths[0] == paths[1] and os.path.isfile(os.path.join(run_dir, "config.json"))

    trained = {}
    for mode in ("fsdp", "ddp"):
        ckpt_root = run_dir if mode == "fsdp" else os.path.join(out_dir, "run_ddp")
        model, opt = build(model_dir, mode)
        train(model, opt, rank)
        random.seed(100 + rank), np.random.seed(100 + rank), torch.manual_seed(100 + rank)
        ckpt = save_checkpoint(ckpt_root, 2, model, tok, opt, {"cursor": 24})
        expected_draws = draws()

        fresh, fresh_opt = build(model_dir, mode)   # untrained weights, empty AdamW state, another lr
        for group in fresh_opt.param_groups:
            group["lr"] = 123.0
        state = load_checkpoint(latest_checkpoint(ckpt_root), fresh, fresh_opt)
        checks[f"{mode}_latest"] = latest_checkpoint(ckpt_root) == ckpt
        checks[f"{mode}_trainer_state"] = state["step"] == 2 and state["cursor"] == 24
        checks[f"{mode}_rng"] = draws() == expected_draws
        checks[f"{mode}_params"], checks[f"{mode}_optim"] = same_shards(model, opt, fresh, fresh_opt)
        checks[f"{mode}_lr"] = all(g["lr"] == 1e-2 for g in fresh_opt.param_groups)
        trained[mode] = (ckpt, full_state(model, opt))

        if mode == "fsdp":
            checks["fsdp_config_in_trainer_state"] = state.get("config") == {"seed": 5, "lr": 1e-2}
            # The HF dir in a plain process gives the sharded model's logits (all ranks run the forward).
            ids = torch.arange(2, 26).view(2, 12)
            with torch.no_grad():
                sharded_logits = fresh(input_ids=ids).logits
            if rank == 0:
                plain = AutoModelForCausalLM.from_pretrained(ckpt)
                with torch.no_grad():
                    checks["hf_logits"] = torch.allclose(plain(input_ids=ids).logits, sharded_logits, rtol=0, atol=1e-5)
                from safetensors import safe_open
                with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
                    keys = set(f.keys())
                checks["tied_written_once"] = "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
                resume_files = set(os.listdir(os.path.join(ckpt, "resume")))
                checks["two_rng_files"] = {"rng_rank0.pt", "rng_rank1.pt"} <= resume_files

    # An FSDP2 checkpoint resumed under DDP: same full weights and optimizer state.
    ckpt, (want_params, want_optim) = trained["fsdp"]
    ddp, ddp_opt = build(model_dir, "ddp")
    load_checkpoint(ckpt, ddp, ddp_opt)
    got_params, got_optim = full_state(ddp, ddp_opt)
    checks["cross_params"] = want_params.keys() == got_params.keys() and all(
        torch.equal(want_params[k], got_params[k]) for k in want_params)
    checks["cross_optim"] = want_optim.keys() == got_optim.keys() and all(
        torch.equal(want_optim[k][n], got_optim[k][n]) for k in want_optim for n in ("exp_avg", "exp_avg_sq", "step"))

    with open(os.path.join(out_dir, f"result_rank{rank}.json"), "w") as f:
        json.dump(checks, f, indent=1)
    dist.destroy_process_group()
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
