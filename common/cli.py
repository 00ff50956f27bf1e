"""One arguments object per script: a dataclass whose fields carry their help text and default.

    @dataclasses.dataclass
    class Args:
        lr: float = arg(2e-6, "AdamW learning rate (paper: 2e-6)", group="optimizer")
    args = parse_args(Args, description=__doc__)

Each field becomes `--lr` (underscores as dashes) in `--help`, grouped under its group; booleans get
`--flag/--no-flag`. `choices` are checked by argparse, so a bad value fails before any compute; so is a
float that is not finite (nan, inf), for every float flag. check_context_length tells a run whose prompts
plus responses cannot fit the model's positions before it loads any weights. resolve_resume and
with_resumed_config implement --resume auto and --resume DIR.
"""
import argparse
import dataclasses
import math
import types
import typing


def arg(default, help: str, *, group: str = "general", choices=None, required: bool = False):
    meta = {"help": help, "group": group, "choices": choices, "required": required}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """int from `int`, `int | None`, `Optional[int]`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        return non_none[0], True
    return tp, False


def _parse_optional(base):
    def conv(text):
        return None if text.lower() in ("none", "") else base(text)
    conv.__name__ = base.__name__
    return conv


def parse_args(cls, argv=None, description: str | None = None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group = groups.get(meta.get("group", "general")) or parser.add_argument_group(meta.get("group", "general"))
        groups[meta.get("group", "general")] = group
        base, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = meta.get("help", "")
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            continue
        if meta.get("required"):
            group.add_argument(flag, type=base, required=True, choices=meta.get("choices"), help=text)
            continue
        conv = _parse_optional(base) if optional else base
        group.add_argument(flag, type=conv, default=default, choices=meta.get("choices"),
                           help=f"{text} (default: {default})")
    ns = parser.parse_args(argv)
    for name, value in vars(ns).items():
        # float() accepts "nan" and "inf": nan passes every `x <= 0`-style check (it compares False), inf
        # any check without an upper bound, and both surface later as NaN losses or a hung loop.
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    args = cls(**vars(ns))
    # which flags the command line gave (whatever their value), for with_resumed_config: parse again with
    # every default suppressed, so only the given ones appear
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    args._given = set(vars(parser.parse_args(argv)))
    return args


def check_context_length(model_path: str, max_prompt_len: int, max_response_len: int, *,
                         flag: str = "--max-response-len") -> int | None:
    """SystemExit if the longest prompt plus `flag`'s response length exceeds the model's context;
    otherwise the model's limit (None if unknown), to cap an engine's max_model_len with.

    Reads max_position_embeddings from model_path/config.json (a local checkpoint directory; anything
    else, or a config without the field, passes). Meant to run before any weights load: vLLM would
    otherwise refuse max_model_len only after the model is in memory, with a message about an env var.
    """
    import json
    import os
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read the model config ({e})")
    # multimodal checkpoints keep the language model's limit under text_config
    limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if not isinstance(limit, int):
        return None
    total = max_prompt_len + max_response_len
    if total <= limit:
        return limit
    fix = (f"lower {flag} to at most {limit - max_prompt_len}" if max_prompt_len < limit else
           "the prompts alone fill it: use shorter prompts or a model with a longer context")
    raise SystemExit(f"{flag} {max_response_len} + the longest prompt, {max_prompt_len} tokens, = {total} tokens, "
                     f"more than the model's max_position_embeddings {limit} ({path}): {fix}")


def with_resumed_config(args):
    """With `args.resume` (a run directory): the run's saved config, except the flags given on this command
    line (e.g. a larger --steps to extend a finished run), whatever their value. (Args built without
    parse_args carry no record of what was given: there, a field at its default reads as not given.)"""
    import json
    import os
    if not getattr(args, "resume", ""):
        return args
    path = os.path.join(args.resume, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"--resume {args.resume}: no config.json there; is it a run directory?")
    saved = json.load(open(path))
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(args)}
    given = getattr(args, "_given", None)
    for name, value in saved.items():
        if name not in defaults or name == "resume":
            continue
        if (name not in given) if given is not None else (getattr(args, name) == defaults[name]):
            setattr(args, name, value)
    return args


def resolve_resume(args, script: str):
    """The run directory's state against --resume, before anything loads.

    `--resume auto` (a relaunch of the same command, e.g. a SLURM --requeue, continues the run): the run
    directory is OUT/RUN_NAME; if it holds a complete checkpoint, args.resume becomes that directory (then
    everything is as `--resume OUT/RUN_NAME`, also for a run that already finished); otherwise args.resume
    becomes "" and the run starts fresh there. A directory left by an attempt killed before its first checkpoint
    is taken over: its metrics.jsonl rows and snapshots are dropped (the fresh run logs and writes them again);
    its config.json, env.json, ... stay, a changed one written beside (common/runlog.py). `--resume DIR` is
    returned as is. No --resume, and a --run-name whose directory already holds a run (a complete checkpoint or
    final/): refused, as a second run's steps and checkpoints would be mixed into it.

    Before the process group exists: every rank reads the same directory (nothing writes a checkpoint at start
    up, so all decide alike); the rank 0 of torchrun's RANK (or a plain process) prints and drops."""
    import os
    from common.checkpoint import drop_snapshots_after, latest_checkpoint
    from common.runlog import truncate_metrics
    run_dir = os.path.join(args.out, args.run_name) if args.run_name else None
    ckpt = latest_checkpoint(run_dir) if run_dir else None
    if not args.resume and run_dir and (ckpt or os.path.isdir(os.path.join(run_dir, "final"))):
        raise SystemExit(f"--run-name {args.run_name}: {run_dir} already holds a run (checkpoints or final/): "
                         f"--resume auto continues it; another --run-name (or removing it) starts a new one")
    if args.resume != "auto":
        return args
    args.resume = run_dir if ckpt else ""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 and ckpt:
        print(f"[{script}] --resume auto: continuing {run_dir} from {ckpt}", flush=True)
    elif rank0 and os.path.isdir(run_dir):
        print(f"[{script}] --resume auto: {run_dir} holds no complete checkpoint: starting the run there afresh "
              f"(dropped {truncate_metrics(os.path.join(run_dir, 'metrics.jsonl'), 0)} metrics rows and the "
              f"snapshots of the earlier attempt)", flush=True)
        drop_snapshots_after(run_dir, 0)
    elif rank0:
        print(f"[{script}] --resume auto: no run in {run_dir} yet: starting it", flush=True)
    return args
