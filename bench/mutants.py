"""Mutation check of the science: does the test suite fail when a line of the science is wrong?

    python bench/mutants.py                 # every mutant (7 min on 2 cores); table + bench/results/mutants.json
    python bench/mutants.py --list          # the mutants, their edits and the tests that must kill them
    python bench/mutants.py --only reward_sign rl_cursor_stuck  # some of them (merged into the JSON)
    python bench/mutants.py --only reward_sign --with-tests tests/test_x.py::test_y   # does this test kill it?

Each mutant below is a small exact textual edit of the science (a sign, a bound, a dropped rule), named with the
quick tests that must fail on it. For each, the tracked and untracked-but-not-ignored files of this checkout are
copied to a temporary directory (this checkout is never modified), the edit applied there, and those tests run
with the venv's python (`pytest -x`, one thread, their own --basetemp): the mutant is killed when one fails. First
a baseline: the union of every mutant's tests must PASS on an unmutated copy, or the table means nothing.

An edit whose old text is not found exactly once fails the whole check before anything runs, so the list cannot
rot silently when the code changes: update the edit with the code.

Why hand-written and not mutmut (or cosmic-ray): those generate syntactic mutants (every operator, constant and
comparison of a file) and run the whole suite against each, thousands of runs of a 20-minute suite; the question
here is a short list of semantic mistakes that matter (a reward sign, a temperature on the wrong side, a dropped
stop token) and the one cheap test that must see each, which a list of (edit, killers) states directly.

Exit status: 0 when every mutant run was killed, 1 when one survived (or its run errored / timed out), 2 when an
edit no longer applies, 3 when the baseline fails.
"""
import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "mutants.json")


@dataclasses.dataclass
class Mutant:
    name: str
    what: str
    edits: list            # [(file relative to the root, old text, new text)], each old text found exactly once
    tests: list            # pytest node ids that must fail on the mutant, cheapest first (pytest -x stops at one)


RL = "tests/test_rl_dapo.py::"
SCI = "tests/test_science.py::"
RL_DIRECTION = SCI + "test_rl_step_raises_log_p_of_right_answers_and_lowers_wrong"
RL_SCORES = SCI + "test_rl_step_scores_are_the_dapo_rewards_and_only_mixed_groups_train"
KL_REFERENCE = "tests/test_losses.py::test_kl_matches_reference_float64"
REHEAT_STEP = SCI + "test_reheat_step_distils_toward_the_tempered_start_model"
REM = "tests/test_remedies.py::"

MUTANTS = [
    # ---- rl_dapo.py: rewards, advantages, the PPO-clip loss, its normaliser
    Mutant("reward_sign", "RL rewards wrong answers: +1 wrong, -1 right",
           [("rl_dapo.py", "scores = [(1.0 if a > 0 else -1.0) + overlong_penalty(",
             "scores = [(-1.0 if a > 0 else 1.0) + overlong_penalty(")],
           [RL_DIRECTION, RL_SCORES]),
    Mutant("advantage_sign", "advantages (mean - r) / std: the group's better responses pushed down",
           [("rl_dapo.py", "return (scores - mean) / (std + 1e-6)", "return (mean - scores) / (std + 1e-6)")],
           [RL + "test_group_advantages_match_float64_reference", RL_DIRECTION]),
    Mutant("advantage_unnormalised", "advantages r - mean, not divided by the group's std",
           [("rl_dapo.py", "return (scores - mean) / (std + 1e-6)", "return scores - mean")],
           [RL + "test_group_advantages_match_float64_reference"]),
    Mutant("clip_bounds_swapped", "clip range [1 - eps_high, 1 + eps_low]: clip-higher inverted",
           [("rl_dapo.py", "pg2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)",
             "pg2 = -adv * ratio.clamp(1 - eps_high, 1 + eps_low)")],
           [RL + "test_dapo_token_loss_cases"]),
    Mutant("dual_clip_positive", "dual-clip cap applied to positive advantages too",
           [("rl_dapo.py", "loss = torch.where(adv < 0, torch.minimum(clipped, pg3), clipped)",
             "loss = torch.minimum(clipped, pg3)")],
           [RL + "test_dapo_token_loss_cases"]),
    Mutant("token_mean_micro_batch", "the step's loss is each micro-batch's token mean, not the mini-batch's",
           [("rl_dapo.py", "loss = (loss_tok.sum() - bonus) * real * scales[mb]",
             "loss = (loss_tok.mean() - bonus) * real * info.world_size")],
           [SCI + "test_rl_step_does_not_depend_on_the_micro_batch_split"]),
    Mutant("token_mean_whole_step", "token_mean_scales normalises by the whole step's tokens, not the mini-batch's",
           [("rl_dapo.py", "return [world_size / sum(n_resp[lo:lo + per_mini]) for lo in range(0, len(n_resp), per_mini)]",
             "return [world_size / sum(n_resp) for lo in range(0, len(n_resp), per_mini)]")],
           [RL + "test_microbatch_split_gives_the_global_token_mean_gradient"]),
    Mutant("overlong_penalty_sign", "overlong shaping rewards length: +(l - (L - B)) / B",
           [("rl_dapo.py", "return -(length - (max_len - buffer)) / buffer * factor",
             "return (length - (max_len - buffer)) / buffer * factor")],
           [RL + "test_overlong_penalty"]),
    Mutant("overlong_wiring_sign", "the step subtracts the (negative) overlong penalty from the reward",
           [("rl_dapo.py", "scores = [(1.0 if a > 0 else -1.0) + overlong_penalty(",
             "scores = [(1.0 if a > 0 else -1.0) - overlong_penalty(")],
           [RL_SCORES]),
    Mutant("truncated_rule_dropped", "common/grading.truncated_is_wrong returns the grades unchanged",
           [("common/grading.py",
             'return [c if grade_truncated or f != "length" else 0.0 for c, f in zip(correct, finish_reasons)]',
             "return list(correct)")],
           ["tests/test_evaluate.py::test_truncated_is_wrong_rule", RL_SCORES]),
    Mutant("truncated_rule_not_called", "rl_dapo's grade_groups skips truncated_is_wrong",
           [("rl_dapo.py",
             "return truncated_is_wrong(correct, [s.finish_reason for g in groups for s in g], args.grade_truncated)",
             "return correct")],
           [RL_SCORES]),
    Mutant("keep_uniform_groups", "dynamic sampling keeps all-right and all-wrong groups",
           [("rl_dapo.py", "return 0 < sum(correct) < len(correct)", "return 0 <= sum(correct) <= len(correct)")],
           [RL + "test_keep_group", RL_SCORES]),
    # ---- the TS-OPSD objective (common/losses.py, reheat_tsopsd.py)
    Mutant("teacher_not_tempered", "teacher logits not divided by tau in the fused KL",
           [("common/losses.py", "zt = z_t.to(row_weight.dtype) * inv_tau  # [R, V]",
             "zt = z_t.to(row_weight.dtype)  # [R, V]")],
           [KL_REFERENCE, REHEAT_STEP]),
    Mutant("student_tempered", "the student's logits divided by tau as well",
           [("common/losses.py", "zs = z_s.to(row_weight.dtype)  # [R, V], fp32 math for bf16 inputs",
             "zs = z_s.to(row_weight.dtype) * inv_tau  # [R, V], fp32 math for bf16 inputs")],
           [KL_REFERENCE, REHEAT_STEP]),
    Mutant("kl_directions_swapped", "reverse_kl computes KL(p_t || p_s) and forward_kl KL(p_s || p_t)",
           [("common/losses.py", 'if divergence == "reverse_kl":  # KL(p_s || p_t)',
             'if divergence == "forward_kl":  # KL(p_s || p_t)'),
            ("common/losses.py", 'elif divergence == "forward_kl":  # KL(p_t || p_s)',
             'elif divergence == "reverse_kl":  # KL(p_t || p_s)')],
           [KL_REFERENCE, REHEAT_STEP]),
    Mutant("reheat_tau_not_passed", "reheat_tsopsd's head distils toward softmax(z), tau never reaches the loss",
           [("reheat_tsopsd.py", "return fused_linear_kl(h, weight, th, tw, mask, tau=args.tau,",
             "return fused_linear_kl(h, weight, th, tw, mask, tau=1.0,")],
           [REHEAT_STEP]),
    Mutant("closed_form_multiplies", "closed form multiplies the final norm by tau instead of dividing",
           [("reheat_tsopsd.py", "lm.model.norm.weight.div_(tau)", "lm.model.norm.weight.mul_(tau)")],
           ["tests/test_reheat.py::test_closed_form_divides_logits_by_tau"]),
    # ---- rollouts, seeds, data, systems
    Mutant("im_end_not_a_stop", "<|im_end|> dropped from the stop ids (only eos and <|endoftext|>)",
           [("common/rollout.py", 'for tok in ("<|im_end|>", "<|endoftext|>"):', 'for tok in ("<|endoftext|>",):')],
           [SCI + "test_stop_ids_hold_both_qwen_endings_whichever_is_eos"]),
    Mutant("derive_seed_ignores_seed", "common/dist.derive_seed ignores its seed",
           [("common/dist.py", "np.random.SeedSequence([seed, rank, step, stream])",
             "np.random.SeedSequence([0, rank, step, stream])")],
           ["tests/test_dist.py::test_derive_seed_is_stable_and_distinct"]),
    Mutant("rl_seed_ignored", "rl_dapo uses seed 0 for its sampling seeds, data order and RNGs whatever --seed",
           [("rl_dapo.py", "seed_everything(derive_seed(args.seed, info.rank))",
             "seed_everything(derive_seed(0, info.rank))"),
            ("rl_dapo.py", "return cycle_problems(train_problems, args.seed, cursor, count)",
             "return cycle_problems(train_problems, 0, cursor, count)"),
            ("rl_dapo.py", "seeds=[derive_seed(args.seed, pos, 0, 1) for pos in positions]",
             "seeds=[derive_seed(0, pos, 0, 1) for pos in positions]")],
           [RL + "test_the_seed_changes_the_run_and_the_same_seed_repeats_it"]),
    Mutant("rl_cursor_stuck", "rl_dapo's data cursor never advances: every batch draws the same prompts",
           [("rl_dapo.py", "cursor += args.gen_batch_prompts", "cursor += 0")],
           [RL + "test_e2e_hf_engine"]),
    Mutant("reheat_seed_ignored", "reheat_tsopsd uses seed 0 for its sampling seeds, data order and RNGs whatever --seed",
           [("reheat_tsopsd.py", "seed_everything(derive_seed(args.seed, info.rank))",
             "seed_everything(derive_seed(0, info.rank))"),
            ("reheat_tsopsd.py", "batch = cycle_problems(problems, args.seed, cursor, args.prompts_per_step)",
             "batch = cycle_problems(problems, 0, cursor, args.prompts_per_step)"),
            ("reheat_tsopsd.py", "seeds = [derive_seed(args.seed, pos, 0, 1) for pos in range(cursor,",
             "seeds = [derive_seed(0, pos, 0, 1) for pos in range(cursor,")],
           ["tests/test_reheat.py::test_the_seed_changes_the_run_and_the_stream_advances"]),
    Mutant("reheat_cursor_stuck", "reheat_tsopsd's data cursor never advances: every step draws the same prompts",
           [("reheat_tsopsd.py", "cursor += args.prompts_per_step", "cursor += 0")],
           ["tests/test_reheat.py::test_the_seed_changes_the_run_and_the_stream_advances"]),
    Mutant("cycle_ignores_cursor", "common/data.cycle_problems starts every draw at the stream's beginning",
           [("common/data.py", "for j in range(cursor, cursor + count):", "for j in range(count):")],
           ["tests/test_data.py::test_cycle_problems_is_one_seeded_permutation_per_epoch_and_the_cursor_continues_it"]),
    # ---- rl_dapo.py: the entropy remedies (issue 19)
    Mutant("entropy_bonus_sign", "the entropy bonus is a penalty: loss + c H",
           [("rl_dapo.py", "loss = (loss_tok.sum() - bonus) * real * scales[mb]",
             "loss = (loss_tok.sum() + bonus) * real * scales[mb]")],
           [REM + "test_entropy_bonus_raises_the_policy_entropy"]),
    Mutant("entropy_gradient_sign", "the chunked head's entropy gradient has the wrong sign",
           [("common/losses.py", "- p * (logp + entropy[:, None]) * grad_entropy[:, None])",
             "+ p * (logp + entropy[:, None]) * grad_entropy[:, None])")],
           [REM + "test_entropy_gradient_matches_float64_reference"]),
    Mutant("clip_cov_keeps_picked", "Clip-Cov picks tokens but leaves their gradient",
           [("rl_dapo.py", "loss = loss * ~picked", "loss = loss * 1")],
           [REM + "test_clip_cov_matches_verl_on_one_selection_set"]),
    Mutant("kl_cov_signed", "KL-Cov penalises log r instead of |log r|",
           [("rl_dapo.py", "kl_cov_coef * log_ratio.abs() * picked", "kl_cov_coef * log_ratio * picked")],
           [REM + "test_kl_cov_matches_verl"]),
    Mutant("low_entropy_tokens", "80/20 keeps the low-entropy tokens",
           [("rl_dapo.py", "return entropy.double() >= global_quantile(entropy, 1.0 - rho)",
             "return entropy.double() <= global_quantile(entropy, rho)")],
           [REM + "test_high_entropy_tokens_match_trl"]),
    Mutant("adaptive_backwards", "the adaptive controller raises the coefficient when entropy is high",
           [("rl_dapo.py", "return min(coef + delta, hi) if entropy <= target else max(coef - delta, lo)",
             "return min(coef + delta, hi) if entropy > target else max(coef - delta, lo)")],
           [REM + "test_adaptive_entropy_coefficient_trajectory"]),
    Mutant("top_k_per_rank", "the global top-k keeps each rank's own best k (per-rank selection, as verl)",
           [("common/select.py", "chosen = all_i[_order(all_s, all_i)[:k]]", "chosen = i[best]")],
           [REM + "test_global_selection_equals_the_selection_on_all_tokens"]),
    # ---- --calibrate-tau (issue 20)
    Mutant("calibrate_prompt_positions", "reheat's --calibrate-tau measures the entropy at the prompt positions",
           [("reheat_tsopsd.py", "head=lambda hid, w: hid[pred][::stride].detach().clone())",
             "head=lambda hid, w: hid[~pred][::stride].detach().clone())")],
           ["tests/test_calibrate.py::test_reheat_calibrates_tau_on_its_own_samples"]),
    Mutant("bisection_backwards", "solve_tau moves the wrong end of the bracket",
           [("common/calibrate.py", "if entropy_at(math.exp(mid)) < target:", "if entropy_at(math.exp(mid)) > target:")],
           ["tests/test_calibrate.py::test_bisection_on_a_known_monotone_function"]),
    Mutant("activation_checkpointing_off", "shard_model leaves the model in eval mode: checkpointing never runs",
           [("common/dist.py", "root.train(requires_grad)", "root.eval()")],
           ["tests/test_activation_checkpointing.py::test_the_loaded_model_recomputes_every_layer_in_backward"]),
    # ---- the reheat's stop and teacher (issue 20), --resume auto (issue 22)
    Mutant("target_window_last_step", "--target-window compares only the last step's entropy with the target",
           [("reheat_tsopsd.py", "return sum(window) / len(window) if len(window) == args.target_window else None",
             "return window[-1] if window else None")],
           ["tests/test_reheat.py::test_target_window_stops_on_the_mean_of_the_last_steps_and_resumes_with_it"]),
    Mutant("teacher_entropy_ignored", "--calibrate-tau calibrates to --target-entropy even when --teacher-entropy is given",
           [("reheat_tsopsd.py", "return args.teacher_entropy if args.teacher_entropy is not None else args.target_entropy",
             "return args.target_entropy")],
           ["tests/test_calibrate.py::test_reheat_calibrates_tau_on_its_own_samples"]),
    Mutant("resume_auto_restarts", "--resume auto starts afresh even when the run directory holds a checkpoint",
           [("common/cli.py", 'args.resume = run_dir if ckpt else ""', 'args.resume = ""')],
           ["tests/test_resume_auto.py::test_auto_continues_a_checkpoint_and_otherwise_takes_over_the_directory"]),
]


# ----------------------------------------------------------------------------- the tree and the edits

def tree_files(root: str) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (new tests not yet committed), that exist."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return sorted({f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f))})


def copy_tree(src: str, files: list[str], dst: str):
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))


def check_edits(root: str, mutants: list) -> list[str]:
    """Every problem with the list: an old text not found exactly once, an edit that changes nothing."""
    problems, names = [], set()
    for m in mutants:
        if m.name in names:
            problems.append(f"{m.name}: duplicate name")
        names.add(m.name)
        for path, old, new in m.edits:
            full = os.path.join(root, path)
            if not os.path.isfile(full):
                problems.append(f"{m.name}: {path} does not exist")
                continue
            n = open(full, encoding="utf-8").read().count(old)
            if n != 1:
                problems.append(f"{m.name}: {path}: old text found {n} times (must be exactly 1): {old!r}")
            if old == new:
                problems.append(f"{m.name}: {path}: the edit changes nothing")
    return problems


def apply_edits(tree: str, m: Mutant):
    for path, old, new in m.edits:
        full = os.path.join(tree, path)
        text = open(full, encoding="utf-8").read()
        assert text.count(old) == 1, (m.name, path, old)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))


# ----------------------------------------------------------------------------- running pytest

def run_pytest(python: str, tree: str, tests: list, *, basetemp: str, stop_first: bool, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    cmd = [python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--basetemp={basetemp}"]
    cmd += (["-x"] if stop_first else []) + tests
    t0 = time.time()
    # its own process group, so that a timeout also ends what the tests started (torchrun workers, vLLM)
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    failed = [line.split(" - ")[0].split(" ", 1)[1] for line in out.splitlines()
              if re.match(r"^(FAILED|ERROR) ", line)]
    reason = next((line[1:].strip() for line in out.splitlines() if line.startswith("E ")), "")
    summary = next((line.strip("= ") for line in reversed(out.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", line)), "")
    return {"rc": rc, "seconds": round(time.time() - t0, 1), "failed": failed, "reason": reason[:300], "summary": summary,
            "tail": out[-3000:]}


def status_of(r: dict) -> str:
    """pytest: 0 all passed, 1 some failed, 2 interrupted (a collection error: the mutant broke an import)."""
    if r["rc"] is None:
        return "timeout"
    return {0: "survived", 1: "killed", 2: "killed"}.get(r["rc"], "error")


def run_mutant(python: str, base: str, work: str, m: Mutant, timeout: int, keep: bool) -> dict:
    tree = os.path.join(work, m.name)
    shutil.copytree(base, tree, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        apply_edits(tree, m)
        if not m.tests:
            return {"rc": None, "seconds": 0.0, "failed": [], "reason": "", "summary": "no killing test listed",
                    "tail": "", "status": "no test"}
        r = run_pytest(python, tree, m.tests, basetemp=os.path.join(work, "tmp_" + m.name), stop_first=True,
                       timeout=timeout)
        r["status"] = status_of(r)
        return r
    finally:
        if not keep:
            shutil.rmtree(tree, ignore_errors=True)
            shutil.rmtree(os.path.join(work, "tmp_" + m.name), ignore_errors=True)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants (results merged into the JSON)")
    ap.add_argument("--list", action="store_true", help="print the mutants, their edits and killing tests, and exit")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1: the tests use a core each)")
    ap.add_argument("--python", default=None, help="interpreter with the project's packages (default: ./.venv's)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run before it counts as not killed")
    ap.add_argument("--with-tests", nargs="+", metavar="NODEID", help="run these tests against the selected mutants "
                    "instead of their own (which tests kill a mutant?); the JSON goes to --out only if given")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline run (only to iterate on the list)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary trees (printed) for inspection")
    ap.add_argument("--out", default=None, help="JSON written here (default bench/results/mutants.json)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.devnull if args.with_tests else RESULTS

    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            raise SystemExit(f"unknown mutant(s) {unknown}; --list shows them")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.with_tests:
        mutants = [dataclasses.replace(m, tests=args.with_tests) for m in mutants]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.what}")
            for path, old, new in m.edits:
                print(f"    {path}: {old!r}\n      -> {new!r}")
            for t in m.tests or ["(none listed: survives until a test is named)"]:
                print(f"    kill: {t}")
        return 0
    problems = check_edits(ROOT, MUTANTS)
    if problems:
        print("the mutant list no longer matches the code (fix the edits in bench/mutants.py):", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 2
    python = args.python or next((p for p in (os.path.join(ROOT, ".venv", "bin", "python"),) if os.path.isfile(p)),
                                 sys.executable)
    t_start = time.time()
    work = tempfile.mkdtemp(prefix="mutants-")
    base = os.path.join(work, "_base")
    copy_tree(ROOT, tree_files(ROOT), base)
    print(f"[mutants] {len(mutants)} mutants, python {python}, trees under {work}", flush=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": python,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "jobs": args.jobs}

    try:
        tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
        if not args.no_baseline and tests:
            print(f"[mutants] baseline: {len(tests)} tests on the unmutated tree ...", flush=True)
            b = run_pytest(python, base, tests, basetemp=os.path.join(work, "tmp_baseline"), stop_first=False,
                           timeout=args.timeout * 2)
            shutil.rmtree(os.path.join(work, "tmp_baseline"), ignore_errors=True)
            b["passed"] = b["rc"] == 0
            report["baseline"] = {"tests": tests, **{k: b[k] for k in ("passed", "rc", "seconds", "failed", "summary")}}
            print(f"[mutants] baseline: {b['summary']} ({b['seconds']:.0f} s)", flush=True)
            if not b["passed"]:
                print(b["tail"], file=sys.stderr)
                print("[mutants] the baseline fails: the killing tests must pass on the unmutated tree first "
                      f"(nothing written to {args.out})", file=sys.stderr)
                return 3

        results = {}
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(run_mutant, python, base, work, m, args.timeout, args.keep): m for m in mutants}
            for fut in cf.as_completed(futures):
                m = futures[fut]
                r = fut.result()
                results[m.name] = r
                print(f"[mutants] {m.name}: {r['status']} ({r['seconds']:.0f} s) {r['failed'][0] if r['failed'] else ''}",
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for m in mutants:
        r = results[m.name]
        rows.append({"name": m.name, "what": m.what, "edits": [{"file": p, "old": o, "new": n} for p, o, n in m.edits],
                     "tests": m.tests, "status": r["status"], "killed": r["status"] == "killed",
                     "killed_by": r["failed"][0] if r["status"] == "killed" and r["failed"] else None,
                     "reason": r.get("reason", ""),
                     "seconds": r["seconds"], "rc": r["rc"], "summary": r["summary"], "date": report["date"],
                     **({"tail": r["tail"]} if r["status"] != "killed" else {})})
    report["total_s"] = round(time.time() - t_start, 1)
    print_table(rows, report["total_s"])
    write_report(args.out, report, rows, merge=bool(args.only))
    return 0 if all(r["killed"] for r in rows) else 1


def print_table(rows: list, total_s: float):
    print()
    print("| mutant | tests run | killed | killed by | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        tests = ", ".join(t.split("::")[-1] for t in r["tests"]) or "-"
        by = r["killed_by"].split("::")[-1] if r["killed_by"] else "-"
        killed = "yes" if r["killed"] else f"**no** ({r['status']})"
        print(f"| {r['name']} | {tests} | {killed} | {by} | {r['seconds']:.0f} |")
    n = sum(r["killed"] for r in rows)
    print(f"\n{n} of {len(rows)} mutants killed; {total_s / 60:.1f} min in all")


def write_report(path: str, report: dict, rows: list, merge: bool):
    """With --only, the rows replace those of the same name in the existing file; the rest is kept."""
    if path == os.devnull:
        return
    if merge and os.path.isfile(path):
        old = json.load(open(path))
        by_name = {r["name"]: r for r in old.get("mutants", [])}
        by_name.update({r["name"]: r for r in rows})
        order = [m.name for m in MUTANTS]
        rows = sorted(by_name.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        report = old | {"last_partial_run": report}
    else:
        report = report | {}
    report["mutants"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"[mutants] wrote {os.path.relpath(path, ROOT) if path.startswith(ROOT) else path}")


if __name__ == "__main__":
    sys.exit(main())
