"""common/cli.py: flags from a dataclass, and --resume's merge of the saved config with the given flags."""
import dataclasses
import json

import pytest

from common.cli import arg, parse_args, with_resumed_config


@dataclasses.dataclass
class Args:
    lr: float = arg(2e-6, "learning rate", group="optimizer")
    steps: int = arg(100, "steps")
    compile: bool = arg(True, "compile")
    engine: str = arg("auto", "engine", choices=("auto", "hf"))
    target: float | None = arg(None, "optional")
    resume: str = arg("", "run directory")


def test_flags_types_and_choices(capsys):
    a = parse_args(Args, ["--lr", "1e-4", "--no-compile", "--target", "none"])
    assert (a.lr, a.steps, a.compile, a.engine, a.target) == (1e-4, 100, False, "auto", None)
    assert parse_args(Args, ["--target", "0.5"]).target == 0.5
    with pytest.raises(SystemExit):
        parse_args(Args, ["--engine", "sglang"])
    assert "invalid choice" in capsys.readouterr().err


def test_resume_keeps_the_saved_config_except_flags_given_now(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"lr": 1e-4, "steps": 50, "compile": False, "engine": "hf",
                                                      "target": 0.3, "resume": "", "world_size": 8}))
    # not given: the saved values; given: the new ones, even when the new value is the flag's default
    a = with_resumed_config(parse_args(Args, ["--resume", str(tmp_path), "--steps", "80", "--lr", "2e-6",
                                              "--compile"]))
    assert (a.lr, a.steps, a.compile, a.engine, a.target) == (2e-6, 80, True, "hf", 0.3)
    b = with_resumed_config(parse_args(Args, ["--resume", str(tmp_path)]))
    assert (b.lr, b.steps, b.compile, b.engine, b.target, b.resume) == (1e-4, 50, False, "hf", 0.3, str(tmp_path))
    assert "world_size" not in dataclasses.asdict(b)             # saved run facts are not flags
    with pytest.raises(SystemExit, match="no config.json"):
        with_resumed_config(parse_args(Args, ["--resume", str(tmp_path / "nope")]))
