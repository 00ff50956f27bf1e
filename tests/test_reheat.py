"""reheat_tsopsd.py: the closed form, the direction of the reheat (tau > 1 heats, tau < 1 cools), every
teacher and divergence, torchrun FSDP2 vs one process, resume, loadable outputs, and bad input."""
import math
import os

import pytest
import torch

import reheat_tsopsd
from tests._scripts import (assert_finite_row, assert_rows_match, assert_same_weights, fixed_sequences,
                            mean_token_entropy, metrics, run_in_process, run_script)

# ----------------------------------------------------------------------------- the closed form


def logits_and_prenorm(model_dir, ids):
    """Final logits and the hidden states entering the final RMSNorm (what the temperature must not touch)."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seen = {}
    hook = lm.model.norm.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0].detach().clone()))
    with torch.no_grad():
        logits = lm(ids).logits
    hook.remove()
    return logits, seen["h"], lm


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
@pytest.mark.parametrize("tau", [1.5, 0.7])
def test_closed_form_divides_logits_by_tau(which, tau, request, tmp_path):
    paths = request.getfixturevalue(which)
    out = str(tmp_path / "closed")
    reheat_tsopsd.main(["--ckpt", paths["model"], "--tau", str(tau), "--closed-form", "--out", out])
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    z0, h0, lm0 = logits_and_prenorm(paths["model"], ids)
    z1, h1, lm1 = logits_and_prenorm(out, ids)
    assert lm1.config.tie_word_embeddings == (which == "tiny")
    torch.testing.assert_close(z1, z0 / tau, rtol=1e-5, atol=1e-5)
    assert torch.equal(h1, h0)                               # hidden states before the final norm unchanged
    p0, p1 = dict(lm0.named_parameters()), dict(lm1.named_parameters())
    changed = [k for k in p0 if not torch.equal(p0[k], p1[k])]
    assert changed == ["model.norm.weight"]                  # the embedding (tied or not) and lm_head untouched
    # and the entropy moved the right way: tau > 1 heats, tau < 1 cools
    ent = [-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1).mean() for z in (z0, z1)]
    assert (ent[1] > ent[0]) == (tau > 1)


# ----------------------------------------------------------------------------- tiny end-to-end runs

REHEAT_METRICS = ["train/lr", "time/rollout", "time/grading", "time/update", "time/weight_sync",
                  "reheat/student_entropy", "reheat/teacher_entropy", "reheat/divergence", "reheat/top1_agree",
                  "rollout/accuracy", "rollout/distinct_answers", "rollout/response_len_mean", "train/grad_norm",
                  "train/tokens", "time/step"]
COMPARED = ["reheat/student_entropy", "reheat/teacher_entropy", "reheat/divergence", "reheat/top1_agree",
            "train/grad_norm", "train/tokens", "rollout/accuracy", "rollout/response_len_mean"]


def reheat_args(ckpt, data, out, name, *extra, steps=2, engine="hf"):
    args = ["--ckpt", ckpt, "--data", data, "--prompt-style", "plain", "--grade-workers", 0, "--rollout-engine", engine,
            "--group-size", 4, "--prompts-per-step", 4, "--max-response-len", 24, "--micro-batch-tokens", 64,
            "--lr", 1e-3, "--no-compile", "--steps", steps, "--out", out, "--run-name", name]
    if engine == "vllm":
        args += ["--vllm-kv-cache-gib", 0.125]
    return [str(a) for a in args + list(extra)]


def check_rows(run_dir, steps):
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert_finite_row(r, REHEAT_METRICS)
        assert r["reheat/divergence"] > 0 and r["train/grad_norm"] > 0 and r["train/tokens"] >= 16
        assert 0 <= r["reheat/top1_agree"] <= 1 and 0 <= r["rollout/accuracy"] <= 1
    return rows


@pytest.fixture(scope="module")
def fixed(tiny_warm):
    seqs, tok = fixed_sequences(tiny_warm["model"], tiny_warm["train"])
    return seqs, tok.pad_token_id, mean_token_entropy(tiny_warm["model"], seqs, tok.pad_token_id)


ROLLOUTS = {}          # run directory -> what its engine sampled (run_in_process), for the runs made in this process


@pytest.fixture(scope="module")
def reheat_up(tiny_warm, tmp_path_factory):
    """The paper's setting on the warm tiny model: frozen teacher, reverse KL, tau = 2, two steps; the script's own
    main() run in this process, its rollouts recorded."""
    out = str(tmp_path_factory.mktemp("reheat"))
    calls = run_in_process(reheat_tsopsd, reheat_args(tiny_warm["model"], tiny_warm["train"], out, "up", "--tau", 2))
    ROLLOUTS[os.path.join(out, "up")] = calls
    return os.path.join(out, "up")


@pytest.mark.slow
def test_tau_2_frozen_teacher_raises_entropy(reheat_up, fixed):
    rows = check_rows(reheat_up, 2)
    first = rows[0]
    # step 1: the student IS the teacher's source, so the teacher is its own softmax(z / 2): hotter, same argmax
    assert first["reheat/teacher_entropy"] > first["reheat/student_entropy"]
    assert first["reheat/top1_agree"] == 1.0
    seqs, pad, start = fixed
    end = mean_token_entropy(os.path.join(reheat_up, "final"), seqs, pad)
    assert end > start + 0.03, f"entropy on fixed text {start:.4f} -> {end:.4f}"


@pytest.mark.slow
def test_reheated_checkpoint_loads_and_generates_in_transformers(reheat_up):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = os.path.join(reheat_up, "final")
    tok = AutoTokenizer.from_pretrained(final)
    lm = AutoModelForCausalLM.from_pretrained(final)
    ids = tok("What is 3+4?\n", return_tensors="pt", add_special_tokens=False).input_ids
    out = lm.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 5)
    # the final checkpoint is the last step's weights
    assert_same_weights(final, os.path.join(reheat_up, "checkpoints", "step_000002"), atol=0)


@pytest.mark.slow
def test_tau_half_online_teacher_lowers_entropy(tiny_warm, fixed, tmp_path):
    run_script("reheat_tsopsd.py", reheat_args(tiny_warm["model"], tiny_warm["train"], str(tmp_path), "down",
                                               "--tau", 0.5, "--teacher", "online", "--divergence", "forward_kl"))
    rows = check_rows(os.path.join(tmp_path, "down"), 2)
    assert rows[0]["reheat/teacher_entropy"] < rows[0]["reheat/student_entropy"]
    seqs, pad, start = fixed
    end = mean_token_entropy(os.path.join(tmp_path, "down", "final"), seqs, pad)
    assert end < start - 0.005, f"entropy on fixed text {start:.4f} -> {end:.4f}"


def jsd_to_teacher(student_dir, teacher_dir, seqs, tau, beta):
    """Float64 reference: mean over the response positions of seqs of beta KL(p_t || M) + (1 - beta) KL(p_s || M),
    M = (1 - beta) p_s + beta p_t, p_s = softmax(z_student), p_t = softmax(z_teacher / tau)."""
    from transformers import AutoModelForCausalLM
    from common.rollout import pack_sequences
    ids, attn, pred, _ = pack_sequences(seqs, 0, "cpu")
    with torch.no_grad():
        z = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64)(ids, attention_mask=attn).logits[pred]
             for d in (student_dir, teacher_dir)]
    logp_s, logp_t = torch.log_softmax(z[0], -1), torch.log_softmax(z[1] / tau, -1)
    log_m = torch.logsumexp(torch.stack([logp_s + math.log(1 - beta), logp_t + math.log(beta)]), 0)
    kl = lambda lp: (lp.exp() * (lp - log_m)).sum(-1)          # noqa: E731
    return float((beta * kl(logp_t) + (1 - beta) * kl(logp_s)).mean())


@pytest.mark.slow
def test_jsd_step_logs_the_jsd_and_lowers_it(tiny_warm, fixed, tmp_path):
    """--divergence jsd --beta 0.3: the divergence logged at step 1 is the float64 JSD(beta) between the start model
    and its own softmax(z / tau) (the frozen teacher) over the response tokens the step sampled (recorded), and the
    step's update (lr 3e-4: Adam's first step moves every weight by ~lr) lowered that JSD on fixed text it never
    sampled."""
    start = tiny_warm["model"]
    calls = run_in_process(reheat_tsopsd, reheat_args(start, tiny_warm["train"], str(tmp_path), "jsd", "--tau", 1.5,
                                                      "--divergence", "jsd", "--beta", 0.3, "--lr", 3e-4, steps=1))
    row = check_rows(os.path.join(tmp_path, "jsd"), 1)[0]
    sampled = [(s["prompt_ids"], s["response_ids"]) for c in calls for g in c["groups"] for s in g]
    assert row["reheat/divergence"] == pytest.approx(jsd_to_teacher(start, start, sampled, 1.5, 0.3), rel=1e-4)
    seqs, _, _ = fixed
    before = jsd_to_teacher(start, start, seqs, 1.5, 0.3)
    after = jsd_to_teacher(os.path.join(tmp_path, "jsd", "final"), start, seqs, 1.5, 0.3)
    assert after < 0.97 * before, (before, after)          # seen: -6%


@pytest.mark.slow
def test_bf16_step_is_close_to_fp32(reheat_up, tiny_warm, tmp_path):
    """--bf16 (the GPU default) on CPU, one process: the student under bf16 autocast, the frozen teacher's head
    held in bf16; the first step's samples are reheat_up's (same seeds, HF engine on the same weights: the
    student's fp32 master weights sample) and its statistics move by bf16 rounding only."""
    run_script("reheat_tsopsd.py", reheat_args(tiny_warm["model"], tiny_warm["train"], str(tmp_path), "bf16",
                                               "--tau", 2, "--bf16", steps=1))
    row, ref = check_rows(os.path.join(tmp_path, "bf16"), 1)[0], metrics(reheat_up)[0]
    assert row["train/tokens"] == ref["train/tokens"] and row["rollout/accuracy"] == ref["rollout/accuracy"]
    for k in ("reheat/student_entropy", "reheat/teacher_entropy", "reheat/divergence", "train/grad_norm"):
        assert row[k] == pytest.approx(ref[k], rel=0.01), f"{k}: bf16 {row[k]} vs fp32 {ref[k]}"   # seen: < 0.3%
    assert row["reheat/divergence"] != ref["reheat/divergence"]          # it did compute in bf16


@pytest.mark.slow
def test_torchrun_fsdp2_matches_one_process_and_vllm_reads_the_reheated_checkpoint(reheat_up, tiny_warm, tmp_path):
    """Start from reheat_up's output (so vLLM loads and samples from a checkpoint this script wrote), frozen
    teacher, one step, with vLLM: its per-position seeds give 2 processes the same samples as 1, and the loss
    is a mean over all tokens of all ranks, so the first-step metrics (incl. grad_norm) agree. Also with one
    vLLM engine split over the 2 ranks (--vllm-tp 2): both ranks hold the same samples and train on half each."""
    pytest.importorskip("vllm")
    ckpt = os.path.join(reheat_up, "final")
    for name, nproc, extra in (("one", 1, []), ("two", 2, []), ("tp2", 2, ["--vllm-tp", 2])):
        run_script("reheat_tsopsd.py", reheat_args(ckpt, tiny_warm["train"], str(tmp_path), name, "--tau", 1.5,
                                                   *extra, steps=1, engine="vllm"), nproc=nproc)
    one = check_rows(os.path.join(tmp_path, "one"), 1)[0]
    assert one["rollout/response_len_mean"] > 0 and one["train/tokens"] > 0
    for name in ("two", "tp2"):
        row = check_rows(os.path.join(tmp_path, name), 1)[0]
        for k in COMPARED:
            assert row[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), f"{name}: {k}: {row[k]} vs 1 process {one[k]}"


@pytest.mark.slow
def test_resume_reproduces_the_straight_run(reheat_up, tiny_warm, tmp_path):
    split = os.path.join(tmp_path, "up")
    run_script("reheat_tsopsd.py", reheat_args(tiny_warm["model"], tiny_warm["train"], str(tmp_path), "up",
                                               "--tau", 2, steps=1))
    run_script("reheat_tsopsd.py", ["--resume", split, "--steps", "2"])
    assert_rows_match(metrics(reheat_up), metrics(split), rel=1e-6)
    assert_same_weights(os.path.join(reheat_up, "final"), os.path.join(split, "final"), atol=1e-6)
    # resuming a finished run does nothing: no new step, same weights, same log
    run_script("reheat_tsopsd.py", ["--resume", split])
    assert sorted(os.listdir(os.path.join(split, "checkpoints"))) == ["step_000001", "step_000002"]
    assert [r["step"] for r in metrics(split)] == [1, 2]
    assert_same_weights(os.path.join(reheat_up, "final"), os.path.join(split, "final"), atol=1e-6)


@pytest.mark.slow
def test_target_entropy_stops_the_run_and_its_resume(reheat_up, tiny_warm, tmp_path):
    """--target-entropy between the student entropies of reheat_up's steps 1 and 2 (the same seed and flags), with
    --steps 4: the run is reheat_up's first two steps and stops there (its checkpoint is step 2's, so are its
    weights); a resume of it (same flags) trains nothing more: no third step, no new checkpoint, the same weights."""
    e1, e2 = [r["reheat/student_entropy"] for r in metrics(reheat_up)]
    assert e2 > e1
    run = os.path.join(tmp_path, "target")
    run_in_process(reheat_tsopsd, reheat_args(tiny_warm["model"], tiny_warm["train"], str(tmp_path), "target",
                                              "--tau", 2, "--target-entropy", (e1 + e2) / 2, steps=4))
    assert_rows_match(metrics(reheat_up), metrics(run), rel=1e-6)
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step_000002"]
    assert_same_weights(os.path.join(reheat_up, "final"), os.path.join(run, "final"), atol=1e-6)
    assert run_in_process(reheat_tsopsd, ["--resume", run]) == []           # nothing sampled
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step_000002"]
    assert_same_weights(os.path.join(reheat_up, "final"), os.path.join(run, "final"), atol=1e-6)


@pytest.mark.slow
def test_target_window_stops_on_the_mean_of_the_last_steps_and_resumes_with_it(reheat_up, tiny_warm, tmp_path):
    """--target-window 2: the stop compares the mean of the last two steps' student entropy with the target.
    (a) A target between that mean and step 2's entropy stops a window-1 run at step 2; with the window the run goes
    on to step 3, and step 2 logs the mean as reheat/stop_entropy. (b) A target just under the mean stops at step 2;
    its resume restores both entropies (not only the last: a window of one would not be full) and trains nothing."""
    e1, e2 = [r["reheat/student_entropy"] for r in metrics(reheat_up)]
    assert e2 > e1
    mean = (e1 + e2) / 2
    args = lambda name, target, steps: reheat_args(tiny_warm["model"], tiny_warm["train"], str(tmp_path), name,  # noqa: E731
                                                   "--tau", 2, "--target-window", 2, "--target-entropy", target,
                                                   "--save-every", 1, steps=steps)
    run_in_process(reheat_tsopsd, args("a", (mean + e2) / 2, 3))
    rows = metrics(os.path.join(tmp_path, "a"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_rows_match(metrics(reheat_up), rows[:2], keys=COMPARED, rel=1e-6)
    assert "reheat/stop_entropy" not in rows[0] and rows[1]["reheat/stop_entropy"] == pytest.approx(mean, rel=1e-12)
    run = os.path.join(tmp_path, "b")
    run_in_process(reheat_tsopsd, args("b", mean * (1 - 1e-6), 4))
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert run_in_process(reheat_tsopsd, ["--resume", run]) == []           # nothing sampled
    assert [r["step"] for r in metrics(run)] == [1, 2]


@pytest.mark.slow
def test_the_seed_changes_the_run_and_the_stream_advances(reheat_up, tiny_warm, tmp_path):
    """reheat_up's two steps drew the data stream's first 8 problems in order (the cursor advances); with --seed 1
    step 1 draws other problems with other sampling seeds, samples otherwise and logs another step."""
    from common.data import cycle_problems, load_problems, render_prompt
    base = ROLLOUTS[reheat_up]
    drawn = [p for c in base for p in c["prompts"]]
    stream = cycle_problems(load_problems(tiny_warm["train"]), 0, 0, 8)
    assert drawn == [render_prompt(p, None, "plain") for p in stream]
    [other] = run_in_process(reheat_tsopsd, reheat_args(tiny_warm["model"], tiny_warm["train"], str(tmp_path), "seed1",
                                                        "--tau", 2, "--seed", 1, steps=1))
    assert other["prompts"] != base[0]["prompts"]
    assert not set(other["seeds"]) & {x for c in base for x in c["seeds"]}
    texts = lambda c: [[s["text"] for s in g] for g in c["groups"]]          # noqa: E731
    assert texts(other) != texts(base[0])
    row, ref = metrics(os.path.join(tmp_path, "seed1"))[0], metrics(reheat_up)[0]
    assert row["reheat/student_entropy"] != ref["reheat/student_entropy"]


# ----------------------------------------------------------------------------- bad input: clear, early, non-zero


@pytest.mark.parametrize("case, message", [
    ("tau_0", "--tau must be > 0"),
    ("tau_negative", "--tau must be > 0"),
    ("missing_ckpt", "checkpoint not found"),
    ("missing_ckpt_closed_form", "checkpoint not found"),
    ("tau_1_frozen", "--tau 1 with a frozen teacher"),
    ("missing_data", "data file not found"),
    ("target_window_0", "--target-window must be >= 1"),
    ("teacher_entropy_alone", "--teacher-entropy needs --calibrate-tau"),
])
def test_bad_input_fails_before_compute(case, message, tiny, tmp_path, capsys):
    out = tmp_path / "runs"
    ok = ["--ckpt", tiny["model"], "--data", tiny["train"]]
    args = {"tau_0": ok + ["--tau", "0"],
            "tau_negative": ok + ["--tau", "-1.5"],
            "missing_ckpt": ["--ckpt", str(tmp_path / "no_such_ckpt"), "--data", tiny["train"]],
            "missing_ckpt_closed_form": ["--ckpt", str(tmp_path / "no_such_ckpt"), "--closed-form"],
            "tau_1_frozen": ok + ["--tau", "1", "--teacher", "frozen"],
            "missing_data": ["--ckpt", tiny["model"], "--data", str(tmp_path / "missing.jsonl")],
            "target_window_0": ok + ["--target-entropy", "0.5", "--target-window", "0"],
            "teacher_entropy_alone": ok + ["--teacher-entropy", "0.5"]}[case]
    with pytest.raises(SystemExit) as e:
        reheat_tsopsd.main(args + ["--prompt-style", "plain", "--out", str(out)])
    assert e.value.code not in (0, None)
    assert message in str(e.value.code) + capsys.readouterr().err
    assert not out.exists()                                  # no run directory, nothing loaded


def test_bad_input_exit_status_from_the_command_line(tiny, tmp_path):
    proc = run_script("reheat_tsopsd.py", ["--ckpt", tiny["model"], "--tau", "1", "--out", str(tmp_path / "runs")],
                      check=False, timeout=120)
    assert proc.returncode == 1 and "--tau 1 with a frozen teacher" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
