"""The README's first command, shortened (`demo.py --quick --sweep`): every stage runs on the shipped tiny model and
the results folder has what the demo promises. Asserts only what holds by construction of the pipeline."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = subprocess.run([sys.executable, "demo.py", "--quick", "--sweep", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=1500, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return str(out), res.stdout


def test_results_list_every_arm_and_the_demo_says_where(demo):
    out, stdout = demo
    text = open(os.path.join(out, "results.md")).read()
    for arm in ("plain", "hot", "tsopsd", "closed"):
        assert f"| {arm} |" in text
    assert "n/a" not in text.split("Checkpoints before continued RL")[0]     # every arm has numbers
    assert os.path.join(out, "results.md") in stdout
    assert glob.glob(os.path.join(out, "eval", "plots", "*.png"))


def test_results_report_the_regime_and_link_the_summary_figure(demo):
    """Stage 1's three numbers against their targets (the issue-13 regime), read from the outputs; the summary figure
    exists and is linked; the collapse trained on the two-operand split and nothing else."""
    import re
    out, _ = demo
    text = open(os.path.join(out, "results.md")).read()
    regime = text.split("## 1. The collapse")[1].split("## 2. The arms")[0]
    for row in ("token entropy at T=1, training problems", "uniform groups", "held-out pass@4"):
        line = next(line for line in regime.splitlines() if line.startswith(f"| {row}"))
        assert re.search(r"\*\*(yes|no)\*\*", line) and "n/a" not in line, line
    assert "](eval/plots/runs_summary.png)" in text
    png = open(os.path.join(out, "eval", "plots", "runs_summary.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    train = os.path.join(out, "data", "train_easy.jsonl")
    rows = [json.loads(line) for line in open(train)]
    operands = [re.fullmatch(r"(\d+)[+-](\d+)", re.search(r"What is (.*)\?", r["prompt"][0]["content"]).group(1))
                for r in rows]
    assert len(rows) == 435 and all(m and max(int(m[1]), int(m[2])) <= 20 for m in operands)
    for run in ("collapse", "plain_s0", "reheat_s0"):
        cfg = json.load(open(os.path.join(out, "runs", run, "config.json")))
        assert cfg["data"] == train
    res = json.load(open(glob.glob(os.path.join(out, "eval_train", "results", "collapsed__*.json"))[0]))
    assert res["macro"]["ent_t1"] > 0


def test_reheating_raises_entropy_above_the_collapsed_policy(demo):
    out, _ = demo
    [path] = glob.glob(os.path.join(out, "eval", "compare__*.json"))
    cmp = json.load(open(path))
    assert cmp["entropy"]["other"] > cmp["entropy"]["base"]          # reheated (other) vs collapsed (base)
    assert cmp["effective_temperature"]["tau"] > 1.0


def rewarded_vs_unrewarded_logprob_change(start_dir, run_dir, n=8):
    """How RL moved the policy on the problems it trained on: the start model samples n responses to each problem
    the run drew (common.data.cycle_problems with the run's seed, up to its final cursor), at T=1, through the
    scripts' HF engine (common.rollout.make_engine around evaluate.hf_model); they are graded; returns (mean change
    of log p(response) from the start model to the run's final policy over the right responses, the same over the
    wrong ones). RL that rewards right answers raises the first and lowers the second."""
    import evaluate
    from transformers import AutoTokenizer
    from common.data import cycle_problems, load_problems, render_prompt
    from common.dist import DistInfo
    from common.grading import grade_batch
    from common.rollout import make_engine, pack_sequences
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    drawn = sum(r["rollout/gen_batches"] for r in rows) * cfg["gen_batch_prompts"]        # the final cursor
    problems = list({p.problem: p for p in cycle_problems(load_problems(cfg["data"]), cfg["seed"], 0, drawn)}.values())
    cpu = torch.device("cpu")
    tok, start = AutoTokenizer.from_pretrained(start_dir), evaluate.hf_model(start_dir, cpu)
    engine = make_engine("hf", model=start, model_path=start_dir, tokenizer=tok, info=DistInfo(), max_model_len=256,
                         seed=0)
    groups = engine.generate([render_prompt(p, tok, cfg["prompt_style"]) for p in problems], n=n, temperature=1.0,
                             max_tokens=cfg["max_response_len"], seeds=list(range(len(problems))))
    samples = [s for g in groups for s in g]
    right = torch.tensor(grade_batch([s.text for s in samples], [p.answer for p, g in zip(problems, groups) for _ in g],
                                     num_workers=0)) > 0
    assert 0 < right.sum() < len(samples)                    # both kinds of response to compare
    ids, attn, pred, targets = pack_sequences([(s.prompt_ids, s.response_ids) for s in samples], tok.pad_token_id, cpu)

    def logp(lm):
        with torch.no_grad():
            z = lm(input_ids=ids, attention_mask=attn).logits.double().log_softmax(-1)
        return (z.gather(-1, targets[..., None])[..., 0] * pred).sum(1)
    change = logp(evaluate.hf_model(os.path.join(run_dir, "final"), cpu)) - logp(start)
    return change[right].mean().item(), change[~right].mean().item()


def test_rl_moved_the_policy(demo):
    """The collapse stage moved the policy, and the right way: on the problems it trained on, the log-prob of the
    start model's right responses rose and that of its wrong ones fell (with the reward's sign flipped in
    rl_dapo.py both turn round: measured -0.11 / +0.11 against +0.035 / -0.157 on the --quick run)."""
    out, _ = demo
    from safetensors.torch import load_file
    start = load_file(os.path.join(ROOT, "assets", "tiny_math", "model", "model.safetensors"))
    collapsed = load_file(os.path.join(out, "runs", "collapse", "final", "model.safetensors"))
    moved = sum((collapsed[k].float() - start[k].float()).norm().item() for k in start)
    assert moved > 0
    right, wrong = rewarded_vs_unrewarded_logprob_change(os.path.join(ROOT, "assets", "tiny_math", "model"),
                                                         os.path.join(out, "runs", "collapse"))
    assert right > 0 > wrong, (right, wrong)
    rows = [json.loads(l) for l in open(os.path.join(out, "runs", "collapse", "metrics.jsonl"))]
    assert all("rollout/accuracy" in r for r in rows) and len(rows) >= 3
    # --quick runs the first steps of the real schedule: lr 3e-4 reached linearly over 20 warmup steps
    assert [r["train/lr"] for r in rows] == pytest.approx([3e-4 * s / 20 for s in (1, 2, 3)])
    assert all(r["train/updates"] >= 1 for r in rows)


def test_every_checkpoint_loads_in_transformers_and_vllm(demo):
    out, _ = demo
    from transformers import AutoModelForCausalLM
    finals = sorted(p for p in glob.glob(os.path.join(out, "runs", "*", "final")) if "_x" not in p)   # not --sweep's
    finals += [os.path.join(out, "runs", "closed_form")]
    assert len(finals) >= 7           # collapse, reheat, 4 arms, closed form
    for path in finals:
        model = AutoModelForCausalLM.from_pretrained(path)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    vllm = pytest.importorskip("vllm")
    for path in finals:
        llm = vllm.LLM(model=path, dtype="float32", max_model_len=128, enforce_eager=True, kv_cache_memory_bytes=32 << 20)
        out_ = llm.generate(["What is 3+4?\n"], vllm.SamplingParams(max_tokens=8), use_tqdm=False)
        assert len(out_[0].outputs[0].token_ids) >= 1
        del llm


def test_sweep_reheats_every_method_to_every_target_and_reports_them(demo):
    """--sweep: TS-OPSD (reverse and forward KL) and the closed form reheated to 0.5, 1 and 2 x H, each continued by
    RL; the 1 x H forward-KL and closed-form points are the tsopsd and closed arms (not run twice); every reheat is
    configured as the tsopsd arm's (teacher at 1.5 x its target, window 5); results.md has a row per point with
    numbers, a test between TS-OPSD and the closed form at each target, and the figure."""
    import re
    out, _ = demo
    text = open(os.path.join(out, "results.md")).read()
    H = float(re.search(r"Matched to H = ([0-9.]+) nats", text).group(1))
    section = text.split("## 3. Dose-response")[1]
    rows = [line for line in section.split("TS-OPSD - closed form at each target")[0].splitlines()
            if line.startswith(("| tsopsd_", "| closed |", "| plain"))]
    assert len(rows) == 10 and not any("n/a" in r for r in rows), rows
    for f in ("0.5", "1", "2"):
        for m in ("tsopsd_reverse_kl", "tsopsd_forward_kl"):
            assert f"| {m}_x{f} - closed_x{f} |" in section
    png = open(os.path.join(out, "eval", "plots", "sweep.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "](eval/plots/sweep.png)" in section
    runs = os.path.join(out, "runs")
    assert not os.path.exists(os.path.join(runs, "reheat_forward_kl_x1_s0"))      # the tsopsd arm's reheat
    assert not os.path.exists(os.path.join(runs, "closed_form_x1"))               # the closed arm's closed form
    for name, div, f in (("reheat_reverse_kl_x2_s0", "reverse_kl", 2), ("reheat_forward_kl_x0.5_s0", "forward_kl", 0.5),
                         ("reheat_reverse_kl_x1_s0", "reverse_kl", 1), ("reheat_s0", "forward_kl", 1)):
        cfg = json.load(open(os.path.join(runs, name, "config.json")))
        assert cfg["divergence"] == div and cfg["calibrate_tau"] and cfg["target_window"] == 5
        assert cfg["target_entropy"] == pytest.approx(f * H, rel=2e-3)
        assert cfg["teacher_entropy"] == pytest.approx(1.5 * cfg["target_entropy"], rel=1e-4)
    for f in (0.5, 2):
        made = json.load(open(os.path.join(runs, f"closed_form_x{f:g}", "closed_form.json")))
        assert made["calibrated"]["target_entropy"] == pytest.approx(f * H, rel=2e-3)
    [arms] = glob.glob(os.path.join(out, "eval_sweep", "arms__*.json"))
    assert set(json.load(open(arms))["arms"]) == {"plain"} | {f"{m}_x{f}" for f in ("0.5", "1", "2")
                                                              for m in ("tsopsd_reverse_kl", "tsopsd_forward_kl", "closed")}


def test_a_stage_is_reused_only_with_the_same_command(tmp_path):
    """demo.cached: a finished stage (final/ and its recorded command) is reused; another command, or a run that
    did not finish, is redone."""
    import demo
    run_dir = tmp_path / "r"
    cmd = ["python", "rl_dapo.py", "--lr", "1e-4"]
    os.makedirs(run_dir / "final")
    assert not demo.cached(str(run_dir), cmd)                # no record: from an older demo, or killed
    demo.record(str(run_dir), cmd)
    assert demo.cached(str(run_dir), cmd)
    assert not demo.cached(str(run_dir), cmd[:-1] + ["2e-4"])
    os.rmdir(run_dir / "final")
    assert not demo.cached(str(run_dir), cmd)
