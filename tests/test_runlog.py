"""common/runlog.py: run dir contents, git info in odd repos, resume rules, metrics.jsonl round trips.
(That every torchrun rank gets rank 0's run dir is checked by tests/_ckpt_worker.py.)"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.runlog import MetricsLogger, env_info, git_info, make_run_dir, read_metrics


@pytest.fixture
def fake_script(tmp_path, monkeypatch):
    script = tmp_path / "rl_fake.py"
    script.write_text("print('the launching script')\n")
    monkeypatch.setattr(sys, "argv", [str(script), "--lr", "0.1"])
    return script


def test_make_run_dir_writes_config_env_command_and_script(tmp_path, fake_script):
    config = {"seed": 3, "lr": 0.1, "model": tmp_path / "m"}          # a Path is written as its text
    run_dir = make_run_dir(str(tmp_path / "runs"), "rl_fake", config)
    assert re.fullmatch(r"rl_fake__3__\d{8}-\d{6}", os.path.basename(run_dir))
    written = json.load(open(os.path.join(run_dir, "config.json")))
    assert written == {"seed": 3, "lr": 0.1, "model": str(tmp_path / "m")}
    env = json.load(open(os.path.join(run_dir, "env.json")))
    assert env["versions"]["torch"] == torch.__version__
    assert set(env["versions"]) >= {"transformers", "vllm", "datasets"}
    assert set(env["git"]) == {"commit", "branch", "dirty", "untracked"}
    assert env["cpu_count"] >= 1 and env["world_size"] == 1 and env["gpu_count"] == torch.cuda.device_count()
    assert open(os.path.join(run_dir, "command.txt")).read().strip().endswith("rl_fake.py --lr 0.1")
    assert open(os.path.join(run_dir, "rl_fake.py")).read() == fake_script.read_text()
    if env["git"]["dirty"] and env["git"]["commit"]:
        assert os.path.getsize(os.path.join(run_dir, "code.diff")) > 0
    assert os.path.basename(make_run_dir(str(tmp_path), "x", {"seed": 0, "run_name": "mine"})) == "mine"


def test_resume_keeps_the_first_config_and_records_changes(tmp_path, fake_script):
    config = {"seed": 0, "lr": 0.1, "run_name": "r"}
    run_dir = make_run_dir(str(tmp_path), "x", config)
    make_run_dir(str(tmp_path), "x", config)                          # same config: nothing new for it
    assert not [f for f in os.listdir(run_dir) if f.startswith("config.resume-")]
    with pytest.warns(UserWarning, match="different config"):
        make_run_dir(str(tmp_path), "x", {**config, "lr": 0.2})
    assert json.load(open(os.path.join(run_dir, "config.json")))["lr"] == 0.1
    changed = [f for f in os.listdir(run_dir) if f.startswith("config.resume-")]
    assert len(changed) == 1 and json.load(open(os.path.join(run_dir, changed[0])))["lr"] == 0.2


def test_git_info_outside_a_repo_without_commits_and_dirty(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_info(str(plain)) == ({"commit": None, "branch": None, "dirty": None, "untracked": None}, None)

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "a.py").write_text("x = 1\n")
    info, diff = git_info(str(repo))                                  # no commits yet: no HEAD to diff
    assert info["commit"] is None and info["dirty"] is True and info["untracked"] == ["a.py"] and diff is None
    env_info(str(repo))                                               # and env.json can still be written

    subprocess.run([*git, "add", "a.py"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    info, diff = git_info(str(repo))
    assert re.fullmatch(r"[0-9a-f]{40}", info["commit"]) and info["dirty"] is False and diff is None
    (repo / "a.py").write_text("x = 2\n")
    info, diff = git_info(str(repo))
    assert info["dirty"] is True and "+x = 2" in diff


def test_metrics_lines_are_strict_json_and_read_back(tmp_path):
    logger = MetricsLogger(str(tmp_path))
    logger.log(0, {"losses/loss": torch.tensor(1.5), "charts/n": np.int64(4), "charts/ratio": np.float32(0.25),
                   "losses/nan": float("nan"), "charts/up": torch.tensor(float("inf")), "charts/down": -math.inf,
                   "charts/hist": torch.tensor([1.0, float("nan")]), "text/sample": "Answer: 25"})
    logger.log(1, {"losses/loss": 1.0})
    logger.close()

    def no_bare_constants(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    raw = [json.loads(line, parse_constant=no_bare_constants) for line in lines]
    assert raw[0]["losses/nan"] == "nan" and raw[0]["charts/up"] == "inf" and raw[0]["charts/hist"] == [1.0, "nan"]

    rows = read_metrics(str(tmp_path))                                # a run dir or the file itself
    assert rows == read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1] and all(isinstance(r["time"], float) for r in rows)
    r = rows[0]
    assert r["losses/loss"] == 1.5 and r["charts/n"] == 4 and r["charts/ratio"] == 0.25
    assert r["text/sample"] == "Answer: 25"
    assert math.isnan(r["losses/nan"]) and r["charts/up"] == math.inf and r["charts/down"] == -math.inf
    assert r["charts/hist"][0] == 1.0 and math.isnan(r["charts/hist"][1])
    with pytest.raises(ValueError, match="step"):
        MetricsLogger(str(tmp_path)).log(2, {"step": 3})


def test_truncate_after_resume_and_a_line_cut_by_a_crash(tmp_path):
    logger = MetricsLogger(str(tmp_path))
    for step in range(6):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:                  # killed mid-write
        f.write('{"step": 6, "lo')

    resumed = MetricsLogger(str(tmp_path))                            # resumed from the step-2 checkpoint
    with pytest.warns(UserWarning, match="not JSON"):
        assert resumed.truncate_after(2) == 3                         # steps 3, 4, 5 (the cut line is dropped too)
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["loss"] == 30.0

    with open(tmp_path / "metrics.jsonl", "a") as f:                  # a crash, then a resume without truncating
        f.write('{"step": 4, "lo')
    MetricsLogger(str(tmp_path)).log(4, {"loss": 40.0})               # starts on a fresh line
    with pytest.warns(UserWarning, match="skipped 1 line"):
        assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4]


def test_disabled_logger_and_missing_mirrors(tmp_path):
    off = MetricsLogger(str(tmp_path / "off"), enabled=False, wandb_project="p", tensorboard=True)
    off.log(0, {"loss": 1.0})
    assert off.truncate_after(0) == 0
    off.close()
    assert not os.path.exists(tmp_path / "off")                        # other ranks touch nothing
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="wandb is not installed"):
            on = MetricsLogger(str(tmp_path / "on"), wandb_project="p")
        on.log(0, {"loss": 1.0})
        on.close()
        assert read_metrics(str(tmp_path / "on"))[0]["loss"] == 1.0


def test_tensorboard_mirror_gets_every_numeric_metric(tmp_path, monkeypatch):
    """--tensorboard: each numeric metric of a row goes to SummaryWriter.add_scalar at the row's step (a stand-in
    writer here: the tensorboard package is optional and not installed in CI); text and lists stay in the JSONL."""
    import sys
    import types
    written, closed = [], []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            closed.append(self.log_dir)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    logger = MetricsLogger(str(tmp_path), tensorboard=True)
    logger.log(3, {"train/loss": 0.5, "train/tokens": 12, "text/sample": "Answer: 4", "hist": [1.0, 2.0],
                   "flag": True})
    logger.close()
    assert sorted(written) == [("train/loss", 0.5, 3), ("train/tokens", 12, 3)]
    assert closed == [os.path.join(str(tmp_path), "tb")]
    assert read_metrics(str(tmp_path))[0]["text/sample"] == "Answer: 4"
