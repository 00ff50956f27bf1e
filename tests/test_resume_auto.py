"""The same command launched again continues the run (a SLURM --requeue after a kill): rl_dapo.py and
reheat_tsopsd.py with --resume auto, evaluate.py by rerunning into its --out; and --snapshot-every's copies.

Every kill is a real SIGKILL of the script's process (tests/_scripts.py: run_killed) at a chosen point, inside a
checkpoint's save where it leaves a half-written step_*.tmp."""
import json
import os
import types

import pytest
import torch

import evaluate
import reheat_tsopsd
import rl_dapo
from common.checkpoint import latest_checkpoint, stored_dtype
from common.cli import resolve_resume
from tests._scripts import (assert_rows_match, assert_same_weights, metrics, run_in_process, run_killed, run_script,
                            weights)
from test_reheat import reheat_args
from test_rl_dapo import rl_args


def listing(path):
    return sorted(os.listdir(path))


def check_snapshots(run, steps, checkpoint_weights: dict, dtype):
    """--snapshot-every 1 --keep-last 1: a snapshot of every step though one checkpoint is kept; each loads in
    transformers, in the start model's dtype, and holds the weights the run had at its step (`checkpoint_weights`:
    step -> the HF weights of that step's checkpoint; the last step's snapshot is final/)."""
    from transformers import AutoModelForCausalLM
    snaps = os.path.join(run, "snapshots")
    assert listing(snaps) == [f"step_{s:06d}" for s in steps]
    assert listing(os.path.join(run, "checkpoints")) == [f"step_{steps[-1]:06d}"]
    for s in steps:
        snap = os.path.join(snaps, f"step_{s:06d}")
        assert "resume" not in os.listdir(snap) and stored_dtype(snap) == dtype
        lm = AutoModelForCausalLM.from_pretrained(snap)
        assert lm.dtype == dtype and torch.isfinite(lm(torch.tensor([[1, 2, 3]])).logits).all()
        got = weights(snap)
        want = checkpoint_weights.get(s) or weights(os.path.join(run, "final"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), s


# ----------------------------------------------------------------------------- the decision, without a run

def test_auto_continues_a_checkpoint_and_otherwise_takes_over_the_directory(tmp_path, capsys):
    """OUT/RUN_NAME with a complete checkpoint: resumed. Absent: a fresh run. Left by an attempt killed before its
    first complete checkpoint (a half-written step_*.tmp): a fresh run there, that attempt's metrics and snapshots
    dropped. Another --resume is left alone."""
    def auto(name, resume="auto"):
        return resolve_resume(types.SimpleNamespace(resume=resume, out=str(tmp_path), run_name=name), "x")

    assert auto("new").resume == "" and not (tmp_path / "new").exists()
    killed = tmp_path / "killed"
    (killed / "checkpoints" / "step_000003.tmp" / "resume").mkdir(parents=True)
    (killed / "snapshots" / "step_000002").mkdir(parents=True)
    (killed / "snapshots" / "step_000003.tmp").mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "tr')
    (killed / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="cut short by a crash"):         # the last row, half written
        assert auto("killed").resume == ""
    assert (killed / "metrics.jsonl").read_text() == "" and os.listdir(killed / "snapshots") == []
    assert (killed / "config.json").exists()
    assert "starting the run there afresh (dropped 2 metrics rows" in capsys.readouterr().out
    saved = tmp_path / "saved"
    (saved / "checkpoints" / "step_000002").mkdir(parents=True)
    (saved / "checkpoints" / "step_000004.tmp").mkdir()
    (saved / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert auto("saved").resume == str(saved)
    assert len((saved / "metrics.jsonl").read_text().splitlines()) == 3       # the resume truncates, later
    assert f"continuing {saved} from {saved / 'checkpoints' / 'step_000002'}" in capsys.readouterr().out
    assert auto("saved", resume=str(tmp_path / "elsewhere")).resume == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("script", [rl_dapo, reheat_tsopsd])
def test_auto_without_a_run_name_fails_before_anything_runs(script, tiny, tmp_path):
    start = ["--model" if script is rl_dapo else "--ckpt", tiny["model"]]
    with pytest.raises(SystemExit) as e:
        script.main([*start, "--data", tiny["train"], "--prompt-style", "plain", "--resume", "auto",
                     "--out", str(tmp_path / "runs")])
    assert str(e.value.code).startswith("--resume auto needs --run-name") and "\n" not in str(e.value.code)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", [rl_dapo, reheat_tsopsd])
@pytest.mark.parametrize("held", ["final", "checkpoint"])
def test_a_fresh_run_into_a_directory_holding_a_run_is_refused(script, held, tiny, tmp_path):
    """Without --resume, a --run-name whose directory holds a run (final/ or a complete checkpoint) would mix two
    runs' steps and checkpoints: a one-line error naming --resume auto, before anything is written or loaded."""
    run = tmp_path / "runs" / "taken"
    (run / ("final" if held == "final" else "checkpoints/step_000002")).mkdir(parents=True)
    before = sorted(str(p) for p in (tmp_path / "runs").rglob("*"))
    start = ["--model" if script is rl_dapo else "--ckpt", tiny["model"]]
    with pytest.raises(SystemExit) as e:
        script.main([*start, "--data", tiny["train"], "--prompt-style", "plain", "--run-name", "taken",
                     "--out", str(tmp_path / "runs")])
    assert str(e.value.code).startswith("--run-name taken:") and "--resume auto" in str(e.value.code)
    assert "\n" not in str(e.value.code) and sorted(str(p) for p in (tmp_path / "runs").rglob("*")) == before


# ----------------------------------------------------------------------------- the scripts, killed and relaunched

@pytest.mark.slow
def test_rl_dapo_the_same_command_after_kills_continues_the_run(tiny_warm, tmp_path, capsys):
    """One command, launched four times: killed inside its first checkpoint's save (nothing to resume); again,
    starting afresh in that directory, killed as it writes step 2's snapshot (which comes before step 2's
    checkpoint, so that a resume redoes it); again, continuing from step 1's checkpoint (step 1 not redone, step 2
    redone once), equal to a straight run of the command under another name; and once more, finished: nothing
    sampled, nothing changed."""
    def command(name):
        return rl_args(tiny_warm, str(tmp_path), name, "--no-compile", "--resume", "auto", "--save-every", 1,
                       "--keep-last", 1, "--snapshot-every", 1)
    run_in_process(rl_dapo, command("straight"))                 # a name not used yet: a fresh run
    assert "no run in" in capsys.readouterr().out
    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")

    run_killed("rl_dapo.py", command("run"), "common.checkpoint:_save_optimizer:1")
    assert latest_checkpoint(run) is None and listing(os.path.join(run, "checkpoints")) == ["step_000001.tmp"]
    first = metrics(run)
    assert [r["step"] for r in first] == [1]

    proc = run_killed("rl_dapo.py", command("run"), "common.checkpoint:save_snapshot:2")
    assert "starting the run there afresh" in proc.stdout
    killed = metrics(run)
    assert [r["step"] for r in killed] == [1, 2] and killed[0]["time"] != first[0]["time"]   # step 1 done anew
    assert listing(os.path.join(run, "checkpoints")) == ["step_000001"]
    assert listing(os.path.join(run, "snapshots")) == ["step_000001"]
    step1 = weights(os.path.join(run, "checkpoints", "step_000001"))

    proc = run_script("rl_dapo.py", command("run"))
    assert "--resume auto: continuing" in proc.stdout and "at step 1" in proc.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[0] == killed[0]        # step 1 kept as logged, not redone
    assert_rows_match(metrics(straight), rows, rel=1e-6)
    assert_same_weights(os.path.join(straight, "final"), os.path.join(run, "final"), atol=1e-6)
    check_snapshots(run, [1, 2], {1: step1}, torch.float32)

    final = weights(os.path.join(run, "final"))
    assert run_in_process(rl_dapo, command("run")) == []          # finished: nothing sampled ...
    assert metrics(run) == rows and listing(os.path.join(run, "checkpoints")) == ["step_000002"]
    assert all(torch.equal(final[k], v) for k, v in weights(os.path.join(run, "final")).items())   # ... or changed


@pytest.fixture(scope="module")
def warm_bf16(tiny_warm, tmp_path_factory):
    """tiny_warm's policy stored in bf16, as the Qwen3 bases are: checkpoints and snapshots export bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = str(tmp_path_factory.mktemp("warm_bf16"))
    AutoModelForCausalLM.from_pretrained(tiny_warm["model"], dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_warm["model"]).save_pretrained(out)
    assert stored_dtype(out) == torch.bfloat16
    return out


@pytest.mark.slow
def test_reheat_the_same_command_after_a_kill_continues_the_run(warm_bf16, tiny_warm, tmp_path):
    """Killed inside the save of its last step (step 2), the same command continues from step 1's checkpoint and
    equals a straight run; its snapshots are bf16 like the start checkpoint; launched again, finished, it does
    nothing."""
    def command(name):
        return reheat_args(warm_bf16, tiny_warm["train"], str(tmp_path), name, "--tau", 2, "--resume", "auto",
                           "--save-every", 1, "--keep-last", 1, "--snapshot-every", 1)
    run_in_process(reheat_tsopsd, command("straight"))
    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")

    run_killed("reheat_tsopsd.py", command("run"), "common.checkpoint:_save_optimizer:2")   # inside step 2's save
    killed = metrics(run)
    assert [r["step"] for r in killed] == [1, 2]
    assert listing(os.path.join(run, "checkpoints")) == ["step_000001", "step_000002.tmp"]
    step1 = weights(os.path.join(run, "checkpoints", "step_000001"))

    proc = run_script("reheat_tsopsd.py", command("run"))
    assert "--resume auto: continuing" in proc.stdout and "resumed from" in proc.stdout and "at step 1" in proc.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[0] == killed[0]
    assert_rows_match(metrics(straight), rows, rel=1e-6)
    assert_same_weights(os.path.join(straight, "final"), os.path.join(run, "final"), atol=0)
    check_snapshots(run, [1, 2], {1: step1}, torch.bfloat16)

    final = weights(os.path.join(run, "final"))
    assert run_in_process(reheat_tsopsd, command("run")) == []
    assert metrics(run) == rows and listing(os.path.join(run, "checkpoints")) == ["step_000002"]
    assert all(torch.equal(final[k], v) for k, v in weights(os.path.join(run, "final")).items())


@pytest.mark.slow
def test_evaluate_the_same_command_after_a_kill_continues(tiny, tmp_path):
    """Killed while sampling its third of four problems, the same command generates only the last two, and writes
    the samples and results of a straight run."""
    def command(out):
        return ["--ckpt", f"m={tiny['model']}", "--benchmarks", f"test={tiny['test']}", "--max-problems", 4,
                "--k", 2, "--max-tokens", 8, "--gen-chunk", 1, "--prompt-style", "plain", "--rollout-engine", "hf",
                "--grade-workers", 0, "--device", "cpu", "--out", out]
    evaluate.main([str(a) for a in command(tmp_path / "straight")])
    run = tmp_path / "run"
    run_killed("evaluate.py", command(run), "evaluate:sample_and_grade:3")
    (cache,) = (run / "generations" / "m").glob("*.jsonl")
    assert len(cache.read_text().splitlines()) == 2 and not (run / "results").exists()

    run_script("evaluate.py", command(run))
    (straight_cache,) = (tmp_path / "straight" / "generations" / "m").glob("*.jsonl")
    assert cache.read_text() == straight_cache.read_text()

    def result(out):
        (path,) = (out / "results").glob("m__*.json")
        return json.loads(path.read_text())
    assert result(run)["generated"] == {"test": 2}
    for key in ("benchmarks", "macro", "per_problem"):
        assert result(run)[key] == result(tmp_path / "straight")[key]
