"""torchrun worker for tests/test_checkpoint.py: checkpoint round trips under FSDP2 and DDP on gloo, on the scripts'
own model: common.loading.load_sharded (FSDP2: built on the meta device, each decoder layer and then the
LMWithHead root sharded by common.dist.shard_model, filled by rank 0's broadcast; DDP: shard_model's DDP around the
LMWithHead root), names with the root's "lm." prefix, the loss computed by a head inside the root's forward.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/_ckpt_worker.py MODEL_DIR OUT_DIR [PLAIN_CKPT]

- fsdp: train 2 steps, save with a bf16 HF export, load into a fresh sharded model and optimizer: this rank's
  parameter and optimizer shards (fp32, from resume/model/) and its RNG draws must be equal. The save gathers
  bf16 shards only (cast before the gather). Rank 0 loads the HF dir in plain transformers: bf16, equal to the
  gathered fp32 weights rounded, lm_head not written. count_params of the sharded model (DTensor numel is
  global) is the plain model's.
- ddp: the same under the scripts' DDP wrapping and an export as held (fp32); rank 0 loads the HF dir: the DDP
  model's logits.
- cross: the fsdp checkpoint into a fresh DDP model: the full weights and optimizer state must equal the
  FSDP2 run's gathered ones (checkpoints are keyed by HF names, DCP reshards). Rank 0 writes those to
  OUT_DIR/fsdp_full.pt with the checkpoint's path, for the test to resume it in one process.
- plain (with PLAIN_CKPT, a one-process checkpoint of the scripts' one-process model; PLAIN_CKPT/../../full.pt holds
  its full state): resumed under FSDP2, the gathered weights and optimizer state must equal it.
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
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.checkpoint import count_params, latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from common.dist import init_distributed  # noqa: E402
from common.loading import load_sharded, make_optimizer  # noqa: E402
from common.runlog import make_run_dir  # noqa: E402

INFO = None


def build(model_dir, mode):
    """The scripts' model (load_sharded, as rl_dapo.py and reheat_tsopsd.py call it) and an AdamW on it."""
    model = load_sharded(model_dir, INFO, mode)
    return model, make_optimizer(model, lr=1e-2, weight_decay=0.1)     # the scripts' optimizer


def lm_loss(model, ids):
    """Next-token cross-entropy, computed by a head inside the root's forward as the scripts' heads are."""
    return model(ids, head=lambda h, w: F.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1), ids[:, 1:].flatten()))


def train(model, opt, rank):
    g = torch.Generator().manual_seed(rank)   # different data per rank, as in training
    for _ in range(2):
        ids = torch.randint(0, 300, (2, 12), generator=g)
        lm_loss(model, ids).backward()
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


def same_full(want, got):
    """(weights equal, optimizer state equal) for two full_state results."""
    (want_params, want_optim), (got_params, got_optim) = want, got
    params = want_params.keys() == got_params.keys() and all(torch.equal(want_params[k], got_params[k])
                                                            for k in want_params)
    optim = want_optim.keys() == got_optim.keys() and all(
        torch.equal(want_optim[k][n], got_optim[k][n]) for k in want_optim for n in ("exp_avg", "exp_avg_sq", "step"))
    return params, optim


def save_recording_gathers(*args, **kwargs):
    """save_checkpoint, and the dtypes of the DTensors it gathers (DTensor.full_tensor)."""
    gathered, original = [], DTensor.full_tensor

    def full_tensor(self, *a, **kw):
        gathered.append(self.dtype)
        return original(self, *a, **kw)

    DTensor.full_tensor = full_tensor
    try:
        return save_checkpoint(*args, **kwargs), gathered
    finally:
        DTensor.full_tensor = original


def same_shards(model, opt, fresh, fresh_opt):
    params = all(torch.equal(local(a), local(b)) for a, b in zip(model.parameters(), fresh.parameters()))
    s0, s1 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    optim = s0.keys() == s1.keys() and all(
        torch.equal(local(s0[k][n]), local(s1[k][n])) for k in s0 for n in ("exp_avg", "exp_avg_sq", "step"))
    return params, optim


def main():
    global INFO
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    plain_ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    INFO = init_distributed("cpu")
    rank = INFO.rank
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
        export = torch.bfloat16 if mode == "fsdp" else None   # the Qwen3 case; the tiny model's (fp32)
        ckpt, gathered = save_recording_gathers(ckpt_root, 2, model, tok, opt, {"cursor": 24}, dtype=export)
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
            # each parameter (a tied one once) was gathered once, already cast to bf16
            checks["fsdp_cast_before_gather"] = (len(gathered) == len(list(model.parameters()))
                                                 and set(gathered) == {torch.bfloat16})
            checks["count_params"] = count_params(fresh) == count_params(AutoModelForCausalLM.from_pretrained(model_dir))
            want_params = trained[mode][1][0]
            if rank == 0:
                # the HF dir in plain transformers: bf16 (dtype "auto" from config.json), the fp32 weights rounded
                plain = AutoModelForCausalLM.from_pretrained(ckpt)
                config = json.load(open(os.path.join(ckpt, "config.json")))
                checks["hf_bf16_export"] = config["dtype"] == "bfloat16" and all(
                    p.dtype == torch.bfloat16 and torch.equal(p, want_params[k].to(torch.bfloat16))
                    for k, p in plain.state_dict().items())
                from safetensors import safe_open
                with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
                    keys = set(f.keys())
                checks["tied_written_once"] = "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
                resume_files = set(os.listdir(os.path.join(ckpt, "resume")))
                checks["two_rng_files"] = {"rng_rank0.pt", "rng_rank1.pt"} <= resume_files
        else:
            # The HF dir (fp32, as held) in a plain process gives the DDP model's logits.
            ids = torch.arange(2, 26).view(2, 12)
            with torch.no_grad():
                ddp_logits = fresh(ids, head=lambda h, w: h @ w.T)
            if rank == 0:
                plain = AutoModelForCausalLM.from_pretrained(ckpt)
                with torch.no_grad():
                    checks["hf_logits"] = torch.allclose(plain(input_ids=ids).logits, ddp_logits, rtol=0, atol=1e-5)

    # An FSDP2 checkpoint resumed under DDP: same full weights and optimizer state.
    ckpt, (want_params, want_optim) = trained["fsdp"]
    ddp, ddp_opt = build(model_dir, "ddp")
    load_checkpoint(ckpt, ddp, ddp_opt)
    checks["cross_params"], checks["cross_optim"] = same_full((want_params, want_optim), full_state(ddp, ddp_opt))
    if rank == 0:   # for the test: the same checkpoint resumed in one process
        torch.save({"ckpt": ckpt, "params": want_params, "optim": want_optim}, os.path.join(out_dir, "fsdp_full.pt"))

    # A one-process checkpoint resumed under FSDP2.
    if plain_ckpt is not None:
        want = torch.load(os.path.join(os.path.dirname(os.path.dirname(plain_ckpt)), "full.pt"), weights_only=True)
        fsdp, fsdp_opt = build(model_dir, "fsdp")
        load_checkpoint(plain_ckpt, fsdp, fsdp_opt)
        checks["plain_to_fsdp_params"], checks["plain_to_fsdp_optim"] = same_full(
            (want["params"], want["optim"]), full_state(fsdp, fsdp_opt))

    with open(os.path.join(out_dir, f"result_rank{rank}.json"), "w") as f:
        json.dump(checks, f, indent=1)
    dist.destroy_process_group()
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
