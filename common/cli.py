"""One arguments object per script: a dataclass whose fields carry their help text and default.

    @dataclasses.dataclass
    class Args:
        lr: float = arg(2e-6, "AdamW learning rate (paper: 2e-6)", group="optimizer")
    args = parse_args(Args, description=__doc__)

Each field becomes `--lr` (underscores as dashes) in `--help`, grouped under its group; booleans get
`--flag/--no-flag`. `choices` are checked by argparse, so a bad value fails before any compute.
"""
import argparse
import dataclasses
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
    args = cls(**vars(ns))
    # which flags the command line gave (whatever their value), for with_resumed_config: parse again with
    # every default suppressed, so only the given ones appear
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    args._given = set(vars(parser.parse_args(argv)))
    return args


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
