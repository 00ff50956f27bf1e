"""Checkpoints: one directory per step that transformers and vLLM load as-is, plus what resuming needs.

    run_dir/checkpoints/step_000010/
        config.json generation_config.json model.safetensors tokenizer*   the HF export, written by rank 0, in
                                     the export dtype (`dtype=`, the source checkpoint's: stored_dtype(path))
        resume/model/                torch.distributed.checkpoint (DCP): the weights as training holds them
                                     (fp32 master weights); every rank writes its own shard, in parallel
        resume/optimizer/            DCP: the AdamW state (two fp32 moments and a step count per parameter)
        resume/trainer_state.json    {"step": 10, **state} (state = data cursor, config, ... from the script)
        resume/rng_rank{r}.pt        python / numpy / torch CPU (/ CUDA) generator states of rank r

One code path for a plain module, DDP and FSDP2 (`fully_shard` per decoder layer, then the root): the
torch.distributed.checkpoint.state_dict helpers name every tensor by its module path (without DDP's
"module." and torch.compile's "_orig_mod."; we also drop a training root's prefix such as
common/dist.py's LMWithHead "lm."). Both DCP parts are keyed by those HF names and hold a tied head once,
so a checkpoint saved under one wrapping or world size resumes under another (DCP reshards on load;
tests/_ckpt_worker.py resumes an FSDP2 checkpoint under DDP, tests/test_checkpoint.py in one process).

Two copies of the weights, for two readers:
- resume/model/ is what load_checkpoint restores: fp32, so a resume is bit-exact, and written shard by
  shard on every rank (no rank gathers the fp32 model).
- the HF export is what eval, vLLM and the next stage read. It is written in `dtype`, which the scripts set
  to the stored dtype of the model the run started from (stored_dtype: bf16 for the Qwen3 bases, fp32 for
  the shipped tiny model): each rank casts its shard, the
  cast shards are gathered one tensor at a time, so rank 0's host RAM holds the model in the export dtype
  (Qwen3-8B: 16.4 GB in bf16, where the fp32 gather took 32.8 GB), and config.json says that dtype, so
  vLLM's and from_pretrained's dtype="auto" read it as the hub checkpoint would be read. A tied head
  (Qwen3-4B, the tiny model) is written once; vLLM and from_pretrained re-tie it from the config.
  dtype=None writes the weights as held (fp32).

Sizes (checkpoint_bytes; count_params counts a tied head once): per parameter 4 B of fp32 DCP weights +
8 B of AdamW moments + the export (2 B bf16, 4 B fp32); tokenizer, configs, DCP metadata and step
counters add a few MB. Checkpoints written before resume/model/ existed held 4 + 8 B (the fp32 export was
also the resume copy). Computed from assets/configs (the parameters of the meta-device model, tied once):

    Qwen3-8B (8,190,735,360 params, untied)   before: fp32 export + moments = 12 B/param = 98.3 GB
                                              now:    14 B/param = 114.7 GB (bf16 export 16.4 GB)
    Qwen3-4B (4,022,468,096 params, tied)     before: 48.3 GB; now: 56.3 GB (bf16 export 8.0 GB)

So a checkpoint takes 2 B/param more disk than before (+17%), and in exchange rank 0 gathers half the
bytes (Qwen3-8B: 16.4 instead of 32.8 GB of host RAM), the 12 B/param of resume state are written by
all ranks in parallel, and every later stage and vLLM read half the bytes. A save writes the new
checkpoint before pruning old ones, so --keep-last K holds up to K + 1 on disk during a save;
check_disk_space fails a run at its start when not even one more fits.

Atomic (against a crashed or killed process, not a power cut: files are not fsync'ed): everything
goes into `step_000010.tmp/`, all ranks meet at a barrier, then rank 0 renames the directory to
`step_000010/` and writes nothing into it after. `latest_checkpoint` only sees renamed directories;
the next save deletes any leftover `*.tmp`. save_hf writes `out.tmp/` and renames it the same way.

Checkpoints from before resume/model/ existed still resume: their HF weights are the fp32 copy, and
load_checkpoint reads them when resume/model/ is absent.

Snapshots (the scripts' --snapshot-every): run_dir/snapshots/step_000010/ holds the HF export alone (weights in
the export dtype, configs, tokenizer; no resume/), written like save_hf (tmp dir, then one rename) and never
pruned by keep_last: n_params x 2 B in bf16 each (Qwen3-4B 8.0 GB, Qwen3-8B 16.4 GB), so that evaluate.py can
be run on every one of them after the run, e.g. to pick the collapse point. A resumed run first drops the
snapshots after the step it resumes from (drop_snapshots_after): they belong to the killed run's steps, which
it recomputes.

    dtype = stored_dtype(args.model)                # the source checkpoint's dtype: bf16 for Qwen3
    check_disk_space(args.out, count_params(model), dtype, args.keep_last)
    ckpt = latest_checkpoint(run_dir)               # None on a fresh run
    if ckpt: state = load_checkpoint(ckpt, model, optimizer); start = state["step"] + 1
    ...
    save_snapshot(run_dir, step, model, tokenizer, dtype=dtype)                # optional, before the checkpoint
    save_checkpoint(run_dir, step, model, tokenizer, optimizer, {"cursor": cursor}, keep_last=2, dtype=dtype)
    save_hf(args.out, model, tokenizer, dtype=dtype)   # the final model, no resume state

Every function here but stored_dtype, count_params, checkpoint_bytes and check_disk_space is collective under
torchrun: call it on all ranks. Those four communicate nothing and give every rank the same answer (for
check_disk_space: as long as run_dir is one filesystem shared by all nodes, as checkpoints need anyway).
"""
import copy
import glob
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

STEP_DIR = re.compile(r"step_(\d+)")   # a complete checkpoint; "step_000010.tmp" does not match


# ----------------------------------------------------------------------------- process helpers
# Plain `python script.py` has no process group; everything below then runs as rank 0 of 1.

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _hf_model(model):
    """(the HF PreTrainedModel inside `model`, the prefix of its names in DCP's state dicts).

    The prefix is "" for a bare, DDP- or compile-wrapped HF model (DCP drops "module." and "_orig_mod."
    itself) and "lm." for common/dist.py's LMWithHead root; FSDP2 shards in place and adds nothing.
    Checkpoints store HF names only, so they load into any of these wrappings."""
    from transformers import PreTrainedModel
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return module, "".join(part + "." for part in name.split(".") if part and part != "_orig_mod")
    raise TypeError(f"no transformers PreTrainedModel inside {type(model).__name__}: nothing to save_pretrained")


def _hf_name(name: str, prefix: str) -> str:
    # A parameter outside the HF model (a value head on the wrapper, say) would be silently lost: refuse.
    if not name.startswith(prefix):
        raise ValueError(f"{name} is outside the HF model, and checkpoints hold only the HF model")
    return name[len(prefix):]


def _rename_optim_state(optim_state: dict, rename) -> dict:
    """The same DCP optimizer state dict with its parameter names passed through `rename`."""
    return {"state": {rename(k): v for k, v in optim_state["state"].items()},
            "param_groups": [{**g, "params": [rename(k) for k in g["params"]]} for g in optim_state["param_groups"]]}


def _tied_names(hf_model) -> dict:
    """{alias: first name} for parameters registered under two names, e.g. Qwen3-4B's lm_head.weight ->
    model.embed_tokens.weight. Found by identity, not from the config, so it holds for any model."""
    first, aliases = {}, {}
    for name, p in hf_model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _dcp_quietly(fn, *args, **kwargs):
    # DCP warns on every call without a process group that it "assumes a single process": it is right.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


def _replace_dir(tmp: str, final: str) -> None:
    """Rank 0 only: make `tmp` visible as `final` in one rename, replacing an older `final` if any
    (re-saving a step after a resume). If we crash between the two renames, the old copy survives as a
    `.tmp` that the next save deletes, and `final` is simply absent: earlier checkpoints still stand."""
    if os.path.exists(final):
        old = final + ".old.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


# ----------------------------------------------------------------------------- weights

def _model_state(model) -> dict:
    """This rank's weights keyed by HF names, a tied alias dropped: DTensor shards under FSDP2 (the
    parameters' own storage), full tensors otherwise. The same keys, in the same order, on every rank."""
    hf_model, prefix = _hf_model(model)
    aliases = _tied_names(hf_model)
    state = {_hf_name(name, prefix): t for name, t in get_model_state_dict(model).items()}
    return {name: t for name, t in state.items() if name not in aliases}


def _save_weights(path: str, model) -> None:
    # Sharded (each rank writes its own shards, in parallel; a replicated DDP tensor is written by one
    # rank) in the dtype training holds them in, keyed by HF names, a tied head once.
    _dcp_quietly(dcp.save, _model_state(model), checkpoint_id=path)


def _load_weights(path: str, model) -> None:
    # DCP reads in place into tensors of this model's shapes and shardings, whatever wrote them.
    hf_model, prefix = _hf_model(model)
    state = _model_state(model)
    _dcp_quietly(dcp.load, state, checkpoint_id=path)
    for alias, name in _tied_names(hf_model).items():   # stored once; set_model_state_dict wants both names
        state[alias] = state[name]
    set_model_state_dict(model, {prefix + name: t for name, t in state.items()})


def _export_state(model, dtype: torch.dtype | None) -> dict:
    """The full weights in `dtype` on rank 0's CPU ({} on the other ranks), keyed by HF names, a tied head
    once. Collective under FSDP2: every rank casts its shard, then the cast shards are gathered one tensor
    at a time, so neither the gather nor rank 0's host ever holds the fp32 model."""
    rank0 = _rank() == 0
    out = {}
    for name, t in _model_state(model).items():
        sharded = isinstance(t, DTensor)
        if not (sharded or rank0):      # a DDP replica: rank 0 has the same tensor
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)             # the shard (DTensor casts locally)
        if sharded:
            t = t.full_tensor()         # all ranks, same order (_model_state's)
        if rank0:
            out[name] = t.cpu()
    return out


def _write_hf(out_dir: str, model, tokenizer, dtype: torch.dtype | None) -> None:
    """Write an HF model dir of the full weights in `dtype` (None: as held) on rank 0 (collective)."""
    state_dict = _export_state(model, dtype)
    if _rank() != 0:
        return
    hf_model = _hf_model(model)[0]
    # save_pretrained also writes config.json and generation_config.json (Qwen3's two stop tokens). It
    # empties the dict it is given, and sets config.dtype to the dtype the model is held in (fp32), so
    # the config is written again with the export's dtype: vLLM's and from_pretrained's "auto" read it.
    hf_model.save_pretrained(out_dir, state_dict=state_dict)
    if dtype is not None:
        config = copy.deepcopy(hf_model.config)
        config.dtype = dtype
        config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _read_hf_weights(ckpt_dir: str, model) -> None:
    """Load the HF safetensors of `ckpt_dir` into `model`, whatever its wrapping (collective). Only for
    checkpoints written before resume/model/ existed, whose HF export is the fp32 master copy."""
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {ckpt_dir}: not a checkpoint written by save_checkpoint")
    # Under torchrun only rank 0 reads the files and DCP broadcasts each tensor into the other ranks'
    # shards: one full CPU copy on the node instead of one per rank.
    broadcast = _distributed() and dist.get_world_size() > 1
    state_dict = {}
    if _rank() == 0 or not broadcast:
        hf_model, prefix = _hf_model(model)
        for f in files:
            state_dict.update(load_file(f))
        held = {p.dtype for p in hf_model.parameters()}
        stored = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        if stored - held:
            warnings.warn(f"{ckpt_dir} has no resume/model/, and its HF weights are {sorted(map(str, stored))} "
                          f"while the model holds {sorted(map(str, held))}: the resumed weights are rounded, "
                          f"not the ones training had")
        for alias, name in _tied_names(hf_model).items():   # written once, see _model_state
            if alias not in state_dict and name in state_dict:
                state_dict[alias] = state_dict[name]
        state_dict = {prefix + k: v for k, v in state_dict.items()}
    # strict (the default): a missing or unexpected key, e.g. another architecture's checkpoint, raises.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    set_model_state_dict(model, state_dict, options=options)


def _save_optimizer(path: str, model, optimizer) -> None:
    # Sharded (each rank writes its own part, in parallel) and keyed by HF parameter names.
    optim_state = get_optimizer_state_dict(model, optimizer)
    prefix = _hf_model(model)[1]
    _dcp_quietly(dcp.save, _rename_optim_state(optim_state, lambda n: _hf_name(n, prefix)), checkpoint_id=path)


def _load_optimizer(path: str, model, optimizer) -> None:
    # DCP loads in place into a state dict of the right shapes and shardings. A fresh AdamW has no state
    # yet; get_optimizer_state_dict creates it (one step with zero grads and lr 0).
    prefix = _hf_model(model)[1]
    optim_state = _rename_optim_state(get_optimizer_state_dict(model, optimizer), lambda n: _hf_name(n, prefix))
    _dcp_quietly(dcp.load, optim_state, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, _rename_optim_state(optim_state, lambda n: prefix + n))


# ----------------------------------------------------------------------------- sizes (no communication)

def stored_dtype(model_path: str) -> torch.dtype:
    """The dtype a HF checkpoint dir stores its weights in: config.json's "dtype" (transformers >= 4.56) or
    "torch_dtype"; float32 when neither is there. bfloat16 for the Qwen3 bases, float32 for assets/tiny_math."""
    config_path = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: stored_dtype reads a local HF checkpoint dir "
                                f"(a hub id: resolve it first with common/dist.py's resolve_model_path)")
    with open(config_path) as f:
        config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{config_path}: dtype {name!r} is not a torch floating-point dtype")
    return dtype


def count_params(model) -> int:
    """The parameters of the HF model inside `model` (plain, DDP, compiled, LMWithHead, FSDP2; meta-device
    too), a tied head once: DTensor.numel() is the global count, so every rank gets the same number."""
    return sum(p.numel() for p in _hf_model(model)[0].parameters())   # parameters() skips a tied alias


def checkpoint_bytes(n_params: int, export_dtype: torch.dtype | None, optimizer: bool = True) -> int:
    """Bytes of one save_checkpoint dir of a model of `n_params` (count_params) held in fp32: the fp32 DCP
    weights, AdamW's two fp32 moments (optimizer=True) and the HF export in `export_dtype` (None: as held,
    fp32). Tokenizer, configs, DCP metadata and AdamW's step counters (a few MB) are left out."""
    export = (export_dtype or torch.float32).itemsize
    return n_params * (4 + (2 * 4 if optimizer else 0) + export)


def check_disk_space(run_dir: str, n_params: int, export_dtype: torch.dtype | None, keep_last: int,
                     optimizer: bool = True, snapshot: bool = False) -> None:
    """Exit (SystemExit, one line) when the filesystem of `run_dir` has no room for one more checkpoint
    (checkpoint_bytes), and with `snapshot` one more snapshot besides (its HF export alone). Reads disk usage
    only: call it on every rank, before training. run_dir need not exist yet (its nearest existing parent is
    asked)."""
    need = checkpoint_bytes(n_params, export_dtype, optimizer)
    need += n_params * (export_dtype or torch.float32).itemsize if snapshot else 0     # the export alone
    path = os.path.abspath(run_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if free >= need:
        return
    export = str(export_dtype or torch.float32).removeprefix("torch.")
    kept = (f"with --keep-last {keep_last} a save holds up to {keep_last + 1} checkpoints, "
            f"{(keep_last + 1) * need / 1e9:.1f} GB; a lower --keep-last needs less" if keep_last > 0 else
            f"--keep-last {keep_last} keeps every checkpoint; a positive --keep-last bounds them")
    raise SystemExit(f"not enough disk for a checkpoint: {path} has {free / 1e9:.1f} GB free, one checkpoint of "
                     f"{n_params / 1e9:.2f}B parameters needs {need / 1e9:.1f} GB (fp32 weights"
                     f"{' + AdamW moments' if optimizer else ''} + {export} export"
                     f"{f' + a {export} snapshot' if snapshot else ''}); point --out at a bigger "
                     f"filesystem ({kept})")


# ----------------------------------------------------------------------------- RNG

def _rng_state() -> dict:
    # Plain lists and tensors, so torch.load(weights_only=True) can read it back.
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()   # this rank's current device
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- public API

def save_hf(out_dir: str, model, tokenizer, *, dtype: torch.dtype | None = None) -> str:
    """Write only the HF model dir (weights, config, generation config, tokenizer), atomically:
    into `out_dir.tmp`, then renamed. For final outputs (`--out`). The weights and config.json are in
    `dtype` (None: as the model holds them; pass stored_dtype(source checkpoint)), cast shard by shard
    before the gather onto rank 0. Collective; returns out_dir."""
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    _write_hf(tmp, model, tokenizer, dtype)
    _barrier()
    if _rank() == 0:
        _replace_dir(tmp, out_dir)
    _barrier()   # nobody returns (and reads out_dir) before it exists
    return out_dir


def save_snapshot(run_dir: str, step: int, model, tokenizer, *, dtype: torch.dtype | None = None) -> str:
    """Write run_dir/snapshots/step_{step:06d}/: the HF model dir alone, as save_hf writes it (atomic, in `dtype`),
    no optimizer or resume state; save_checkpoint's keep_last never deletes it. Collective; returns the dir."""
    return save_hf(os.path.join(run_dir, "snapshots", f"step_{step:06d}"), model, tokenizer, dtype=dtype)


def drop_snapshots_after(run_dir: str, step: int) -> None:
    """Delete the snapshots of steps after `step` (and leftover `*.tmp` of killed writes): a run resumed from the
    checkpoint of `step` (0: a fresh start in a directory an earlier attempt left) recomputes those steps, so
    their snapshots would be of another trajectory. Rank 0 deletes; call it on every rank."""
    root = os.path.join(run_dir, "snapshots")
    if _rank() == 0 and os.path.isdir(root):
        for name in os.listdir(root):
            m = STEP_DIR.fullmatch(name)
            if (m and int(m.group(1)) > step) or name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    _barrier()


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer=None, state: dict | None = None, *,
                    keep_last: int = 2, dtype: torch.dtype | None = None) -> str:
    """Write run_dir/checkpoints/step_{step:06d}/ (layout in the module docstring) atomically, then
    delete all but the newest `keep_last` complete checkpoints (<= 0 keeps all). Collective.

    `dtype`: the HF export's (None: as the model holds them; pass stored_dtype(source checkpoint)). The
    resume copy in resume/model/ is always as held, so resuming is exact whatever the export.

    `state` is anything JSON can hold (data cursor, config, ...); load_checkpoint returns it with "step"
    added. If it has no "config", run_dir/config.json (see common/runlog.py) is copied in, so a
    checkpoint dir describes itself when moved elsewhere."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    rank = _rank()

    trainer_state = {"step": step, **(state or {})}
    config_path = os.path.join(run_dir, "config.json")
    if "config" not in trainer_state and os.path.isfile(config_path):
        with open(config_path) as f:
            trainer_state["config"] = json.load(f)
    trainer_state_json = json.dumps(trainer_state, indent=1)   # a bad `state` fails here, before any I/O

    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):   # leftovers of a crashed save, ours included
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(os.path.join(tmp, "resume"))
    _barrier()

    _write_hf(tmp, model, tokenizer, dtype)
    _save_weights(os.path.join(tmp, "resume", "model"), model)
    if optimizer is not None:
        _save_optimizer(os.path.join(tmp, "resume", "optimizer"), model, optimizer)
    torch.save(_rng_state(), os.path.join(tmp, "resume", f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "resume", "trainer_state.json"), "w") as f:
            f.write(trainer_state_json)

    _barrier()   # every rank's files are in tmp
    if rank == 0:
        _replace_dir(tmp, final)
        if keep_last > 0:
            complete = sorted((int(m.group(1)), name) for name in os.listdir(root)
                              if (m := STEP_DIR.fullmatch(name)))
            for _, name in complete[:-keep_last]:
                if os.path.join(root, name) != final:   # never the one just written
                    shutil.rmtree(os.path.join(root, name))
    _barrier()   # nobody returns (and looks for the checkpoint) before it exists
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete run_dir/checkpoints/step_* dir (highest step), or None if there is none."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(root) if (m := STEP_DIR.fullmatch(name))]
    return os.path.join(root, max(steps)[1]) if steps else None


def load_checkpoint(ckpt_dir: str, model, optimizer=None) -> dict:
    """Restore a save_checkpoint dir into `model` (plain, DDP or FSDP2; same shapes), `optimizer` (a
    fresh one is fine) and this rank's RNGs; returns the trainer state ({"step": ..., **state}). Collective.

    The weights come from resume/model/ (as training held them: exact), or, in a checkpoint written before
    that existed, from its HF export (then the fp32 master copy; a warning if it is not the held dtype).

    The optimizer's param_groups (lr, betas, ...) come back as saved, so a changed --lr on resume must
    be set again after this call. An LR scheduler is not saved: derive the LR from the step."""
    resume = os.path.join(ckpt_dir, "resume")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint at {ckpt_dir}; latest_checkpoint(run_dir) gives the newest "
                                f"complete one (None on a fresh run)")
    if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise FileNotFoundError(f"{ckpt_dir} has no resume/trainer_state.json, so it cannot be resumed: it was "
                                f"written by save_hf (or by hand). To start a new run from its weights, load it "
                                f"with AutoModelForCausalLM.from_pretrained instead.")
    optim_dir = os.path.join(resume, "optimizer")
    if optimizer is not None and not os.path.isdir(optim_dir):
        raise FileNotFoundError(f"{ckpt_dir} was saved without an optimizer (no resume/optimizer/); "
                                f"call load_checkpoint(..., optimizer=None) and start the optimizer fresh")

    model_dir = os.path.join(resume, "model")
    if os.path.isdir(model_dir):
        _load_weights(model_dir, model)
    else:                       # the old layout: no DCP weights, the HF export is the fp32 copy
        _read_hf_weights(ckpt_dir, model)
    if optimizer is not None:
        _load_optimizer(optim_dir, model, optimizer)

    rng_path = os.path.join(resume, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=True))
    else:   # resumed on more ranks than saved: the new ranks keep their seeded generators
        warnings.warn(f"{rng_path} missing (saved with fewer ranks?): this rank's RNG is not restored")

    with open(os.path.join(resume, "trainer_state.json")) as f:
        return json.load(f)


def architecture_difference(path_a: str, path_b: str) -> str:
    """Why one vLLM engine cannot serve both checkpoints by swapping their weights in ('' when it can): vLLM
    built its network, context and tokenizer from the first, so the configs (but for fields that do not change
    the network) and the tokenizers must be the same."""
    from transformers import AutoTokenizer
    ignored = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache")
    conf = [{k: v for k, v in json.load(open(os.path.join(p, "config.json"))).items() if k not in ignored}
            for p in (path_a, path_b)]
    keys = sorted(k for k in conf[0].keys() | conf[1].keys() if conf[0].get(k) != conf[1].get(k))
    if keys:
        return f"their config.json differ in {', '.join(keys)}"
    ta, tb = AutoTokenizer.from_pretrained(path_a), AutoTokenizer.from_pretrained(path_b)
    if ta.get_vocab() != tb.get_vocab() or ta.chat_template != tb.chat_template:
        return "their tokenizers differ"
    return ""
