"""common/cli.py: flags from a dataclass, and --resume's merge of the saved config with the given flags."""
import dataclasses
import json
import typing

import pytest

from common.cli import _base_type, arg, check_context_length, parse_args, with_resumed_config


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


def _float_flags(cls):
    hints = typing.get_type_hints(cls)
    return [(f.name, _base_type(hints[f.name])[1]) for f in dataclasses.fields(cls) if _base_type(hints[f.name])[0] is float]


def _script_args():
    import demo
    import evaluate
    import reheat_tsopsd
    import rl_dapo
    return {"rl_dapo": rl_dapo.Args, "reheat_tsopsd": reheat_tsopsd.Args, "evaluate": evaluate.Args, "demo": demo.Args}


def test_every_float_flag_of_every_script_must_be_finite():
    scripts = _script_args()
    flags = {name: _float_flags(cls) for name, cls in scripts.items()}
    # the examples are among them, so the loop below is not vacuous
    assert {"lr", "rollout_temperature"} <= {f for f, _ in flags["rl_dapo"]}
    assert {"tau", "lr"} <= {f for f, _ in flags["reheat_tsopsd"]} and flags["evaluate"] and flags["demo"]
    for script, cls in scripts.items():
        for name, optional in flags[script]:
            flag = "--" + name.replace("_", "-")
            for bad in ("nan", "inf", "-inf", "NaN", "1e999"):
                with pytest.raises(SystemExit) as e:
                    parse_args(cls, [f"{flag}={bad}"])    # "=": argparse reads a bare -inf as a flag
                expected = f"{flag} must be a finite number, got {float(bad)}"
                assert e.value.code == expected, f"{script} {flag} {bad}"
            assert getattr(parse_args(cls, [flag, "0.5"]), name) == 0.5
            if optional:                                   # unset stays allowed
                assert getattr(parse_args(cls, [flag, "none"]), name) is None


def test_non_finite_message_is_the_flag_and_value():
    with pytest.raises(SystemExit, match=r"^--lr must be a finite number, got nan$"):
        parse_args(Args, ["--lr", "nan"])
    with pytest.raises(SystemExit, match=r"^--target must be a finite number, got inf$"):
        parse_args(Args, ["--target", "inf"])
    assert parse_args(Args, []).target is None


def _config(tmp_path, **fields):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", **fields}))
    return str(tmp_path)


def test_context_length_names_flag_lengths_sum_and_limit(tmp_path):
    model = _config(tmp_path, max_position_embeddings=1024)
    assert check_context_length(model, 100, 924) == 1024   # exactly the limit fits; the limit comes back
    with pytest.raises(SystemExit) as e:
        check_context_length(model, 100, 8192)
    msg = e.value.code
    assert msg.startswith("--max-response-len 8192 + the longest prompt, 100 tokens, = 8292 tokens")
    assert "max_position_embeddings 1024" in msg and "lower --max-response-len to at most 924" in msg
    assert "\n" not in msg
    with pytest.raises(SystemExit, match=r"^--max-tokens 20480 .* 20580 tokens.*lower --max-tokens to at most 924"):
        check_context_length(model, 100, 20480, flag="--max-tokens")
    with pytest.raises(SystemExit, match="the prompts alone fill it"):
        check_context_length(model, 2000, 64)


def test_context_length_passes_without_a_limit(tmp_path):
    assert check_context_length(str(tmp_path / "no_such_dir"), 10**6, 10**6) is None   # a hub id or missing dir
    assert check_context_length(_config(tmp_path), 10**6, 10**6) is None               # no max_position_embeddings
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    with pytest.raises(SystemExit, match="max_position_embeddings 4096"):
        check_context_length(_config(vlm, text_config={"max_position_embeddings": 4096}), 100, 4000)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read the model config"):
        check_context_length(str(tmp_path), 1, 1)


def test_context_length_on_the_tiny_model(tiny):
    # the issue's case: the scripts' defaults against the shipped tiny model's 1024 positions
    with open(tiny["model"] + "/config.json") as f:
        limit = json.load(f)["max_position_embeddings"]
    with pytest.raises(SystemExit, match=f"max_position_embeddings {limit}"):
        check_context_length(tiny["model"], 40, 20480)
    check_context_length(tiny["model"], 40, 64)
