"""The paper's whole experiment on a shipped tiny math model, on a CPU, in minutes.

The same three scripts that run Qwen3-8B on 8 GPUs, run here as subprocesses on a 640k-parameter Qwen3
that was supervised on noisy worked arithmetic (assets/tiny_math: `python -m common.tiny` rebuilds it):

  1. collapse   rl_dapo.py from the tiny model on the easy problems of train.jsonl: two operands, both <= 20
                ("What is 13+16?", 435 of its 4000; written to OUT/data/train_easy.jsonl): groups of 8, 16
                prompts per step, lr 3e-4 after 20 warmup steps, 350 steps. Nothing but RL: on problems it can
                mostly solve, DAPO sharpens the policy until most groups are all right, dynamic sampling drops
                them (and a step may find too few mixed groups to update at all), and the held-out pass@8
                (2-4 operands up to 30) falls below the start model's
  2. arms       the target entropy H: the start model's own-sample token entropy at T=1 on the training
                problems (what the collapse took away). From the collapsed checkpoint, equal continued-RL budgets
                (30 DAPO steps at lr 1e-4 on the same problems), each arm matched to H where it has a knob:
                  plain      continued DAPO
                  hot        continued DAPO sampling at the temperature tau(H) (the paper's baseline): the tau at
                             which the collapsed model's own samples have entropy H (reheat_tsopsd --calibrate-tau)
                  tsopsd     reheat_tsopsd.py to H (frozen teacher at tau(1.5 H): a student approaches its
                             teacher's entropy from below and levels off short of it; forward KL at lr 5e-4; stops
                             when the mean of its last 5 steps' entropy reaches H, at most 100 steps), then
                             continued DAPO
                  closed     the closed-form reheat at tau(H) (final norm / tau), then continued DAPO; sampling it
                             at T=1 is sampling the collapsed model at T=tau(H): the hot arm's starting law
                  bonus      continued DAPO with the adaptive entropy bonus aiming at H (rl_dapo --entropy-target)
                and, for the displacement analysis, a sharpening distillation at 1/tau for as many steps as the
                reheat took (evaluate.py --displacement). With --sweep, a dose-response: TS-OPSD (reverse and
                forward KL) and the closed form to 0.5 H, H and 2 H, each followed by the same continued DAPO
  3. evaluate   evaluate.py on the held-out problems for every checkpoint (avg@k, pass@k, and each one's own
                token entropy at T=1), the start and collapsed models' entropy on the training problems, the
                analyses of collapsed vs reheated (entropy, effective temperature, top-k overlap, hidden-state
                similarity), and the curves of every run (arms drawn from the collapse's last step on)
  4. results    OUT/results.md: the regime reached (the three numbers of the collapse, with their targets),
                the arms' table and tests, every number read from the runs' own outputs; plots in OUT/eval/plots

    python demo.py                      # ~8 minutes on 2 CPU cores, 1 seed
    python demo.py --seeds 3            # three seeds per arm (~12 minutes): mean and 95% CI, seed-aware tests
    python demo.py --seeds 3 --sweep    # and the dose-response (39 minutes measured, beside other jobs)
    python demo.py --quick              # a few steps of everything (what CI runs)

Learning rates are 50-250x the paper's 2e-6: the tiny model needs them to move in hundreds of steps. What a toy
can show: the mechanics (RL collapses entropy and diversity, reheating raises them, RL continues from each
start) and how the arms compare on this task; not whether the paper's claim holds for Qwen3 on competition math.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from common.cli import arg, parse_args
from common.runlog import read_metrics

ROOT = os.path.dirname(os.path.abspath(__file__))
ARMS = ("plain", "hot", "tsopsd", "closed", "bonus")
SWEEP = ("tsopsd_reverse_kl", "tsopsd_forward_kl", "closed")      # --sweep: methods x multiples of H
SWEEP_FACTORS = (0.5, 1.0, 2.0)
SPLITS = {"easy": "two operands, both <= 20", "two_term": "two operands", "all": "every problem"}


@dataclasses.dataclass
class Args:
    out: str = arg("runs/demo", "output folder (results.md, plots/, run directories)")
    model: str = arg(os.path.join("assets", "tiny_math", "model"), "starting policy (the shipped tiny math model)")
    data: str = arg(os.path.join("assets", "tiny_math", "data"), "folder with train.jsonl and test.jsonl")
    seeds: int = arg(1, "seeds per arm (the collapse run uses seed 0)")
    quick: bool = arg(False, "tiny budgets for a smoke test (CI)")
    collapse_steps: int = arg(350, "DAPO steps of the collapse stage")
    collapse_lr: float = arg(3e-4, "DAPO learning rate of the collapse stage (~4e-4 and above breaks the policy)")
    collapse_warmup: int = arg(20, "linear warmup steps of the collapse stage (1 at 3e-4 breaks the policy)")
    train_split: str = arg("easy", "training problems of the collapse, the reheat and the arms: easy (the problems "
                           "of train.jsonl with two operands, both <= 20: the policy collapses onto them), two_term "
                           "(two operands: it collapses less) or all (groups stay mixed)", choices=tuple(SPLITS))
    jobs: int = arg(2, "stages run side by side in stage 2 (arms of a seed), each with cores / jobs threads; 1: one "
                    "after another, streaming progress bars")
    arm_steps: int = arg(30, "continued-DAPO steps of every arm")
    reheat_steps: int = arg(100, "TS-OPSD steps at most before the tsopsd arm's continued RL (it stops at the target)")
    target_entropy: float | None = arg(None, "entropy H the arms are matched to (default: the start model's own-sample "
                                       "entropy at T=1 on the training problems, measured first)")
    divergence: str = arg("forward_kl", "TS-OPSD divergence of the tsopsd arm: forward_kl (mass-covering) reaches H in "
                          "~30-50 steps on this model; reverse_kl (the script's default, mode-seeking) was at half of "
                          "it after 40 steps at lr 3e-4 and broke accuracy at 1e-3 (README.md#what-the-demo-shows)",
                          choices=("reverse_kl", "forward_kl", "jsd"))
    bonus_delta: float = arg(0.05, "adaptive entropy bonus step of the bonus arm (TRL's 0.005 barely moves in the ~20 "
                             "updates of 30 collapsed steps: bench/results/remedies_probe.json)")
    lr: float = arg(1e-4, "DAPO learning rate of the arms (50x the paper's 2e-6: a 640k-parameter model needs it)")
    reheat_lr: float = arg(5e-4, "TS-OPSD learning rate (at 3e-4 forward KL was short of H after 40 steps)")
    teacher_factor: float = arg(1.5, "the TS-OPSD teacher's tau is calibrated to this multiple of the reheat's target "
                                "entropy (reheat_tsopsd --teacher-entropy): with the teacher at the target itself the "
                                "student levelled off at ~0.75 of it in 100 steps; at 1.5x it stopped in 16-54 steps within "
                                "10% of it (3 seeds), at 2x it overshot by 40% (measured from the 3-seed run's collapse)")
    target_window: int = arg(5, "TS-OPSD stops when the mean of its last this-many steps' entropy reaches the target "
                             "(reheat_tsopsd --target-window): one step's 16 prompts first cross it on a blip (the "
                             "3-seed run with a window of 1 stopped 15-30% short)")
    sweep: bool = arg(False, "also the dose-response: TS-OPSD with reverse and with forward KL, and the closed form, "
                      "reheated to 0.5, 1 and 2 x H, each followed by the arms' continued DAPO (the 1 x H forward-KL "
                      "run of --divergence and the closed form's are the tsopsd and closed arms); a table, tests between TS-OPSD and the "
                      "closed form at each target, and a figure of continued-RL accuracy against start entropy")
    group_size: int = arg(8, "samples per prompt")
    prompts_per_step: int = arg(16, "groups per DAPO step")
    max_response_len: int = arg(64, "max tokens per response")
    eval_k: int = arg(8, "samples per held-out problem")
    eval_problems: int = arg(256, "held-out problems evaluated")
    entropy_problems: int = arg(128, "training problems on which the start and collapsed models' entropy is measured")
    update_readme: bool = arg(False, "also copy results.md into README.md (between the demo-results markers)")
    engine: str = arg("hf", "rollout engine for every stage: hf or vllm (see README: hf is faster at this size)",
                      choices=("hf", "vllm"))


def run(cmd: list[str], log: str, threads: int | None = None):
    """Run one stage as its own process (as a user would), keeping a log. Alone (threads None) it streams its
    progress bar; beside another stage it runs with `threads` threads and says only when it ends."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"\n$ {' '.join(cmd)}" if threads is None else f"[demo] started {os.path.basename(log)[:-4]}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if threads is None and (line.startswith("[") or "it/s" in line or "s/it" in line):
                sys.stdout.write(line)
                sys.stdout.flush()
        if proc.wait():
            raise SystemExit(f"stage failed (exit {proc.returncode}): see {log}")
    if threads is not None:
        print(f"[demo] done {os.path.basename(log)[:-4]} in {time.time() - t0:.0f} s", flush=True)


def cached(run_dir: str, cmd: list[str]) -> bool:
    """A stage is reused when its run finished (final/ exists) with the very same command (demo_command.json, written
    when it finished): a demo re-run with other flags redoes the stages they change."""
    path = os.path.join(run_dir, "demo_command.json")
    return os.path.isdir(os.path.join(run_dir, "final")) and os.path.isfile(path) and json.load(open(path)) == cmd


def record(run_dir: str, cmd: list[str]):
    with open(os.path.join(run_dir, "demo_command.json"), "w") as f:
        json.dump(cmd, f)


def training_split(train: str, split: str, path: str) -> str:
    """The problems of train.jsonl in `split` (SPLITS), written to path: what the collapse, the reheat and the
    arms train on. "What is 13+16?" has two operands, 13 and 16."""
    import re
    if split == "all":
        return train
    rows = [json.loads(line) for line in open(train) if line.strip()]

    def operands(row):
        return [int(x) for x in re.findall(r"\d+", re.search(r"What is (.*)\?", row["prompt"][-1]["content"]).group(1))]
    keep = [r for r in rows if len(operands(r)) == 2 and (split == "two_term" or max(operands(r)) <= 20)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    return path


def main(argv=None):
    args = parse_args(Args, argv, description=__doc__)
    if args.jobs < 1 or args.seeds < 1:
        raise SystemExit(f"--jobs and --seeds must be >= 1, got {args.jobs} and {args.seeds}")
    if args.quick:
        args.collapse_steps, args.arm_steps, args.reheat_steps = 3, 2, 2         # the first steps of each stage
        args.eval_problems, args.eval_k, args.prompts_per_step, args.entropy_problems = 32, 4, 8, 16
    train, test = os.path.join(args.data, "train.jsonl"), os.path.join(args.data, "test.jsonl")
    for path in (args.model, train, test):
        if not os.path.exists(path):
            raise SystemExit(f"{path} not found: rebuild the tiny model with `python -m common.tiny assets/tiny_math "
                             f"--sft-steps 1200 --n-train 4000 --n-test 256 --max-operand 30 --sft-slip 0.15` "
                             f"(see assets/tiny_math/BUILD.json)")
    out = os.path.abspath(args.out)
    runs, logs = os.path.join(out, "runs"), os.path.join(out, "logs")
    for d in (runs, logs):
        os.makedirs(d, exist_ok=True)
    train = training_split(train, args.train_split, os.path.join(out, "data", f"train_{args.train_split}.jsonl"))
    t_start, timings = time.time(), {}
    py = sys.executable
    common_rl = ["--data", train, "--prompt-style", "plain", "--rollout-engine", args.engine,
                 "--group-size", str(args.group_size), "--prompts-per-step", str(args.prompts_per_step),
                 "--gen-batch-prompts", str(2 * args.prompts_per_step), "--max-gen-batches", "4",
                 "--ppo-mini-batch", str(args.prompts_per_step), "--micro-batch-tokens", "512",
                 "--max-response-len", str(args.max_response_len), "--overlong-buffer", str(args.max_response_len // 4),
                 "--val-data", test, "--val-max-problems", "128", "--val-n", "2",
                 "--no-compile", "--out", runs, "--save-every", "0", "--keep-last", "1", "--grade-workers", "0"]
    if args.engine == "vllm":
        common_rl += ["--vllm-kv-cache-gib", "0.25"]

    threads = None if args.jobs == 1 else max(1, (os.cpu_count() or 1) // args.jobs)

    def rl(name, model, steps, seed, lr, warmup, val_every, extra=(), threads=None):
        run_dir = os.path.join(runs, name)
        cmd = [py, "rl_dapo.py", "--model", model, "--steps", str(steps), "--seed", str(seed), "--run-name", name,
               "--lr", str(lr), "--warmup-steps", str(warmup), "--val-every", str(val_every), *common_rl, *extra]
        if not cached(run_dir, cmd):
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.time()
            run(cmd, os.path.join(logs, name + ".log"), threads)
            record(run_dir, cmd)
            timings[name] = time.time() - t0
        return run_dir

    def arm(name, model, seed, extra=()):
        return rl(name, model, args.arm_steps, seed, args.lr, 1, max(args.arm_steps // 6, 1), extra, threads)

    def reheat(seed, name, extra, divergence=args.divergence):
        reheat_dir = os.path.join(runs, name)
        cmd = [py, "reheat_tsopsd.py", "--ckpt", collapsed, "--data", train, "--prompt-style", "plain",
               "--rollout-engine", args.engine, "--group-size", str(args.group_size),
               "--prompts-per-step", str(args.prompts_per_step), "--max-response-len", str(args.max_response_len),
               "--lr", str(args.reheat_lr), "--seed", str(seed), "--divergence", divergence,
               "--micro-batch-tokens", "512", "--no-compile", "--grade-workers", "0", "--save-every", "0",
               "--out", runs, "--run-name", name, *extra] + (["--vllm-kv-cache-gib", "0.25"] if args.engine == "vllm" else [])
        if not cached(reheat_dir, cmd):
            shutil.rmtree(reheat_dir, ignore_errors=True)
            t0 = time.time()
            run(cmd, os.path.join(logs, f"{name}.log"), threads)
            record(reheat_dir, cmd)
            timings[name] = time.time() - t0
        return os.path.join(reheat_dir, "final")

    def to_target(h):
        """reheat_tsopsd's flags for a reheat to entropy h: teacher calibrated to --teacher-factor x h, the stop on
        the mean of the last --target-window steps, at most --reheat-steps steps."""
        return ["--calibrate-tau", "--target-entropy", f"{h:.6g}", "--teacher-entropy", f"{args.teacher_factor * h:.6g}",
                "--target-window", str(args.target_window), "--steps", str(args.reheat_steps)]

    def closed_form(path, h):
        """The closed form at tau(h) (reheat_tsopsd --closed-form --calibrate-tau), redone if made for another h."""
        made = os.path.join(path, "closed_form.json")
        if os.path.isfile(made) and json.load(open(made)).get("calibrated", {}).get("target_entropy") != float(f"{h:.6g}"):
            shutil.rmtree(path)                         # calibrated for another target: redo
        if not os.path.isdir(path):
            run([py, "reheat_tsopsd.py", "--ckpt", collapsed, "--closed-form", "--calibrate-tau", "--target-entropy",
                 f"{h:.6g}", "--data", train, "--prompt-style", "plain", "--rollout-engine", args.engine,
                 "--group-size", str(args.group_size), "--prompts-per-step", str(args.prompts_per_step),
                 "--max-response-len", str(args.max_response_len), "--no-compile", "--out", path]
                + (["--vllm-kv-cache-gib", "0.25"] if args.engine == "vllm" else []),
                os.path.join(logs, os.path.basename(path) + ".log"))
        return path

    # ---- 1. collapse
    print(f"[demo] 1/4 collapse: DAPO from {args.model} for {args.collapse_steps} steps on {train}", flush=True)
    collapse = rl("collapse", args.model, args.collapse_steps, 0, args.collapse_lr, args.collapse_warmup,
                  max(args.collapse_steps // 14, 1))
    collapsed = os.path.join(collapse, "final")

    # ---- 2. the target entropy, then the arms: equal continued-RL budgets from the collapsed checkpoint
    eval_dir, eval_train = os.path.join(out, "eval"), os.path.join(out, "eval_train")
    sampling = ["--k", str(args.eval_k), "--prompt-style", "plain", "--max-tokens", str(args.max_response_len),
                "--temperature", "1.0", "--rollout-engine", args.engine, "--entropy-samples", str(args.eval_k),
                "--hf-batch-size", "256", "--grade-workers", "0"]
    sampling += ["--vllm-kv-cache-gib", "0.25"] if args.engine == "vllm" else []

    def evaluate_train(ckpts: dict):
        """Each checkpoint's own-sample entropy (and accuracy) on the training problems (cached per checkpoint)."""
        run([py, "evaluate.py", "--ckpt", *[f"{k}={v}" for k, v in ckpts.items()], "--benchmarks", f"train={train}",
             "--max-problems", str(args.entropy_problems), *sampling, "--out", eval_train],
            os.path.join(logs, "evaluate_train.log"))
    evaluate_train({"start": args.model, "collapsed": collapsed})
    target = args.target_entropy or read_evals(eval_train)["start"]["macro"]["ent_t1"]
    print(f"[demo] 2/4 arms matched to the start model's entropy on the training problems, H = {target:.4f}", flush=True)
    closed = closed_form(os.path.join(runs, "closed_form"), target)
    tau = json.load(open(os.path.join(closed, "closed_form.json")))["tau"]
    arm_runs = {name: [None] * args.seeds for name in ARMS}
    reheated = {}
    # --sweep: (method, multiple of H) -> the runs of every seed; the starting checkpoints; the closed forms
    sweep = {(m, f): [None] * args.seeds for m in SWEEP for f in SWEEP_FACTORS} if args.sweep else {}
    sweep_starts = {key: [None] * args.seeds for key in sweep}
    closed_x = {f: closed if f == 1 else closed_form(os.path.join(runs, f"closed_form_x{f:g}"), f * target)
                for f in (SWEEP_FACTORS if args.sweep else ())}

    def chain_a(seed):
        arm_runs["plain"][seed] = arm(f"plain_s{seed}", collapsed, seed)
        arm_runs["hot"][seed] = arm(f"hot_s{seed}", collapsed, seed, ["--rollout-temperature", f"{tau:.6g}"])
        arm_runs["bonus"][seed] = arm(f"bonus_s{seed}", collapsed, seed, [
            "--entropy-target", f"{target:.6g}", "--entropy-coef-delta", str(args.bonus_delta)])

    def chain_b(seed):
        reheated[seed] = reheat(seed, f"reheat_s{seed}", to_target(target))
        arm_runs["tsopsd"][seed] = arm(f"tsopsd_s{seed}", reheated[seed], seed)
        arm_runs["closed"][seed] = arm(f"closed_s{seed}", closed, seed)
        if seed == 0:       # Delta_low: as many steps at 1/tau as the reheat took at tau (evaluate --displacement)
            rows = read_metrics(os.path.dirname(reheated[0]))
            reheat(0, "sharpen_s0", ["--tau", f"{1 / rows[-1]['reheat/tau']:.6g}", "--steps", str(len(rows))])

    def sweep_point(seed, method, f):
        """--sweep: one method reheated to f x H, then the arms' continued DAPO (the tsopsd / closed arm at 1 x H)."""
        if method == "closed":
            start = closed_x[f]
            runs_ = arm_runs["closed"][seed] if f == 1 else arm(f"closed_x{f:g}_s{seed}", start, seed)
        elif method == f"tsopsd_{args.divergence}" and f == 1:
            start, runs_ = reheated[seed], arm_runs["tsopsd"][seed]
        else:
            div = method.split("_", 1)[1]
            start = reheat(seed, f"reheat_{div}_x{f:g}_s{seed}", to_target(f * target), divergence=div)
            runs_ = arm(f"{method}_x{f:g}_s{seed}", start, seed)
        sweep_starts[method, f][seed], sweep[method, f][seed] = start, runs_

    def chain_c(seed):
        for f in SWEEP_FACTORS:
            sweep_point(seed, "tsopsd_reverse_kl", f)

    def chain_d(seed):
        for method in ("tsopsd_forward_kl", "closed"):
            for f in SWEEP_FACTORS:
                sweep_point(seed, method, f)

    # two chains per seed (four with --sweep), side by side (--jobs; plumbing only: every stage is the same
    # command either way); the sweep's 1 x H points wait for the arms they reuse
    print(f"[demo] arms, {args.seeds} seed(s), {args.jobs} stage(s) at a time", flush=True)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        for job in [pool.submit(chain, seed) for seed in range(args.seeds) for chain in (chain_a, chain_b)]:
            job.result()
        for job in [pool.submit(chain, seed) for seed in range(args.seeds) for chain in (chain_c, chain_d) if sweep]:
            job.result()
    reheated = dict(sorted(reheated.items()))

    # ---- 3. evaluate: accuracy and own-sample entropy of every checkpoint, arms over seeds, collapsed vs
    # reheated, the displacement, curves; the reheated checkpoints' entropy on the training problems (each arm's
    # entropy at the start of its continued RL, measured as the target was)
    print("[demo] 3/4 evaluate every checkpoint on the held-out set, compare collapsed vs reheated", flush=True)
    t0 = time.time()
    ckpts = {"start": args.model, "collapsed": collapsed, "closed_form": closed}
    ckpts |= {f"reheated_s{s}": p for s, p in reheated.items()}
    arms = {arm: [os.path.join(d, "final") for d in dirs] for arm, dirs in arm_runs.items()}
    sharpened = os.path.join(runs, "sharpen_s0", "final")
    run([py, "evaluate.py", "--ckpt", *[f"{k}={v}" for k, v in ckpts.items()],
         "--arms", *[f"{arm}={','.join(paths)}" for arm, paths in arms.items()],
         "--compare", f"collapsed={collapsed}", f"reheated={reheated[0]}",
         "--displacement", f"collapsed={collapsed}", f"sharpened={sharpened}", f"reheated={reheated[0]}",
         "--runs", f"collapse={collapse}", *[f"{os.path.basename(d)}={d}" for ds in arm_runs.values() for d in ds],
         *[f"reheat_s{s}={os.path.dirname(p)}" for s, p in reheated.items()],
         "--benchmarks", f"heldout={test}", "--max-problems", str(args.eval_problems), *sampling,
         "--compare-problems", "64", "--compare-n", str(args.group_size), "--analysis-tokens", "2048",
         "--out", eval_dir], os.path.join(logs, "evaluate.log"))
    starts = {"start": args.model, "collapsed": collapsed, "closed_form": closed,
              **{f"reheated_s{s}": p for s, p in reheated.items()}}
    for (method, f), paths in sweep_starts.items():         # --sweep: every other starting checkpoint, once
        for seed, path in enumerate(paths):
            if path not in starts.values():
                starts[f"{method}_x{f:g}" + ("" if method == "closed" else f"_s{seed}")] = path
    evaluate_train(starts)
    eval_sweep = os.path.join(out, "eval_sweep")
    if sweep:       # the sweep's continued-RL checkpoints with the plain arm: accuracy, tests between arms
        sweep_arms = {"plain": arms["plain"]} | {f"{m}_x{f:g}": [os.path.join(d, "final") for d in sweep[m, f]]
                                                 for f in SWEEP_FACTORS for m in SWEEP}
        run([py, "evaluate.py", "--arms", *[f"{name}={','.join(paths)}" for name, paths in sweep_arms.items()],
             "--benchmarks", f"heldout={test}", "--max-problems", str(args.eval_problems), *sampling,
             "--out", eval_sweep], os.path.join(logs, "evaluate_sweep.log"))
    timings["evaluate"] = time.time() - t0

    # ---- 4. results
    write_results(out, args, ckpts, arm_runs, reheated, eval_dir, eval_train, collapse, train, timings, target, tau,
                  time.time() - t_start, sweep and (sweep, sweep_starts, eval_sweep))
    if args.update_readme:
        update_readme(os.path.join(out, "results.md"), eval_dir)
    print(f"\n[demo] done in {(time.time() - t_start) / 60:.1f} min. Results: {os.path.join(out, 'results.md')}; "
          f"details and plots: {eval_dir} (results.md, plots/); run directories: {runs}", flush=True)


def update_readme(results_md: str, eval_dir: str, readme: str = os.path.join(ROOT, "README.md")):
    """Put a demo's results.md into the README verbatim, so no number there is typed by hand; its figures are
    copied to docs/demo/ (committed, unlike runs/)."""
    start, end = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
    text = open(readme).read()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    body = open(results_md).read().replace("# TS-OPSD demo: results", "").strip()
    os.makedirs(os.path.join(ROOT, "docs", "demo"), exist_ok=True)
    for name in FIGURES:
        src = os.path.join(eval_dir, "plots", name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(ROOT, "docs", "demo", name))
            body = body.replace(f"](eval/plots/{name})", f"](docs/demo/{name})")
    body = body.replace("](eval/", "](runs/demo/eval/")
    head, rest = text.split(start, 1)
    with open(readme, "w") as f:
        f.write(head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])


FIGURES = ("runs_summary.png", "runs_entropy.png", "runs_accuracy.png", "runs_uniform_groups.png", "sweep.png")


def label_of(ckpt_path: str, evals: dict) -> str:
    """evaluate.py's label for a checkpoint it was given as a bare path (arms are)."""
    for label, data in evals.items():
        if os.path.abspath(data.get("checkpoint", "")) == os.path.abspath(ckpt_path):
            return label
    return ckpt_path


def read_evals(eval_dir: str) -> dict:
    """label -> evaluate.py's results JSON (results/<label>__<settings>.json)."""
    import glob
    evals = {}
    for path in glob.glob(os.path.join(eval_dir, "results", "*.json")):
        data = json.load(open(path))
        evals[data.get("label") or os.path.basename(path).split("__")[0]] = data
    return evals


def regime(collapse_dir: str, evals: dict, evals_train: dict, k: int, last: int = 10) -> dict:
    """The three numbers of the collapse (issue 13's targets) and what explains them, from the outputs."""
    from common.runlog import read_metrics
    rows = read_metrics(collapse_dir)

    def window(rs, key):
        vals = [r[key] for r in rs if key in r]
        return sum(vals) / len(vals) if vals else None
    tail = rows[-last:]
    seen = sum(r["rollout/groups_seen"] for r in tail)
    right, wrong = sum(r["rollout/groups_all_right"] for r in tail), sum(r["rollout/groups_all_wrong"] for r in tail)
    head = rows[:last]
    macro = lambda e, key: e.get("macro", {}).get(key)   # noqa: E731
    out = {"steps": len(rows), "last": last,
           "ent_train": (macro(evals_train.get("start", {}), "ent_t1"), macro(evals_train.get("collapsed", {}), "ent_t1")),
           "ent_heldout": (macro(evals.get("start", {}), "ent_t1"), macro(evals.get("collapsed", {}), "ent_t1")),
           "ent_rollout": (window(head, "rollout/entropy_est"), window(tail, "rollout/entropy_est")),
           "uniform": (sum(r["rollout/groups_all_right"] + r["rollout/groups_all_wrong"] for r in head)
                       / max(sum(r["rollout/groups_seen"] for r in head), 1), (right + wrong) / max(seen, 1)),
           "all_right": right / max(seen, 1), "all_wrong": wrong / max(seen, 1),
           "gen_batches": (window(head, "rollout/gen_batches"), window(tail, "rollout/gen_batches")),
           "pass": (macro(evals.get("start", {}), f"pass@{k}"), macro(evals.get("collapsed", {}), f"pass@{k}")),
           "avg": (macro(evals.get("start", {}), f"avg@{k}"), macro(evals.get("collapsed", {}), f"avg@{k}"))}
    e0, e1 = out["ent_train"]
    out["ent_ratio"] = e1 / e0 if e0 and e1 is not None else None
    out["met"] = {"entropy": out["ent_ratio"] is not None and out["ent_ratio"] <= 1 / 3,
                  "uniform": out["uniform"][1] >= 0.5,
                  "pass": None not in out["pass"] and out["pass"][1] < out["pass"][0]}
    return out


def ci_text(t: dict | None) -> str:
    """One test between arms (evaluate.py's arms JSON) as 'diff [lo, hi], p = ...'."""
    return f"{t['diff']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], p = {t['p_value']:.4f}" if t else "-"


def write_results(out, args, ckpts, arm_runs, reheated, eval_dir, eval_train, collapse, train, timings, target, tau,
                  seconds, sweep=None):
    """results.md: every number read from the runs' metrics.jsonl and evaluate.py's JSON, none typed in."""
    from common.runlog import read_metrics
    from common.stats import mean_ci
    import glob
    evals, evals_train = read_evals(eval_dir), read_evals(eval_train)

    def acc(name, key):
        return evals.get(name, {}).get("macro", {}).get(key)

    def tail_mean(run_dir, key, n=5):
        vals = [r[key] for r in read_metrics(run_dir) if key in r][-n:]
        return sum(vals) / len(vals) if vals else None

    def f3(v):
        return "n/a" if v is None else f"{v:.3f}"

    def fmt(values):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        m, lo, hi = mean_ci(values)
        return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

    k, rg = args.eval_k, regime(collapse, evals, evals_train, args.eval_k)
    yes = lambda ok: "**yes**" if ok else "**no**"   # noqa: E731
    stage_times = ", ".join(f"{name} {t:.0f} s" for name, t in timings.items())
    lines = ["# TS-OPSD demo: results", "",
             f"Command: `python demo.py {' '.join(sys.argv[1:])}`; seeds: {args.seeds}; engine: {args.engine}; "
             f"wall time {seconds / 60:.1f} min on {os.cpu_count()} CPU cores ({stage_times or 'all stages cached'}).",
             "", f"## 1. The collapse: {rg['steps']} DAPO steps from the start model on "
             f"{os.path.basename(train)}", "",
             f"Entropy: each model's mean token entropy at T=1 over its own samples (k={k}) of {args.entropy_problems} "
             f"training problems (evaluate.py `ent_t1`). Uniform: groups all right or all wrong, summed over the first "
             f"and the last {rg['last']} steps (`rollout/uniform_frac`). pass@{k}: {args.eval_problems} held-out "
             f"problems (2-4 operands).", "",
             "| | start | collapsed | target | met |", "|---|---|---|---|---|",
             f"| token entropy at T=1, training problems | {f3(rg['ent_train'][0])} | {f3(rg['ent_train'][1])} "
             f"(ratio {f3(rg['ent_ratio'])}) | ratio <= 0.333 | {yes(rg['met']['entropy'])} |",
             f"| uniform groups (first / last {rg['last']} steps) | {f3(rg['uniform'][0])} | {f3(rg['uniform'][1])} "
             f"({f3(rg['all_right'])} all right, {f3(rg['all_wrong'])} all wrong) | >= 0.5 | {yes(rg['met']['uniform'])} |",
             f"| held-out pass@{k} | {f3(rg['pass'][0])} | {f3(rg['pass'][1])} | below the start's | "
             f"{yes(rg['met']['pass'])} |",
             f"| held-out avg@{k} | {f3(rg['avg'][0])} | {f3(rg['avg'][1])} | | |",
             f"| token entropy at T=1, held-out problems | {f3(rg['ent_heldout'][0])} | {f3(rg['ent_heldout'][1])} | | |",
             f"| rollout entropy, all groups (first / last {rg['last']} steps) | {f3(rg['ent_rollout'][0])} | "
             f"{f3(rg['ent_rollout'][1])} | | |",
             f"| generation batches per step (first / last {rg['last']}) | {f3(rg['gen_batches'][0])} | "
             f"{f3(rg['gen_batches'][1])} | | |", "",
             "![collapse, then the arms: rollout entropy, held-out accuracy and uniform groups against step]"
             "(eval/plots/runs_summary.png)", "",
             f"## 2. The arms: {args.arm_steps} continued-DAPO steps each from the collapsed checkpoint", "",
             f"Matched to H = {target:.4f} nats, " + ("given by --target-entropy" if args.target_entropy else
             "the start model's token entropy at T=1 on its own samples of the training problems (section 1)") +
             f"; tau(H) = {tau:.3f}: the temperature at which the collapsed model's own samples have entropy H "
             f"(reheat_tsopsd --calibrate-tau). Start entropy: the arm's starting law's token entropy at T=1 on its own "
             f"samples of the same {args.entropy_problems} training problems, measured as H was (hot: the collapsed "
             f"model sampled at tau(H), which is the closed form's law; bonus: the collapsed model, whose RL the "
             f"adaptive bonus then pushes toward H). Held-out: {args.eval_problems} problems, k={k} samples each at "
             f"T=1. Rollout entropy and uniform groups: mean of the arm's last 5 steps of RL (at the arm's rollout "
             f"temperature). ent_t1: the final checkpoint's token entropy at T=1 on its own held-out samples. With "
             f"several seeds: mean [95% CI].", "",
             f"| arm | start | start entropy (H = {target:.3f}) | rollout entropy, last 5 | uniform groups, last 5 | "
             f"ent_t1 | held-out avg@{k} | pass@{k} |", "|---|---|---|---|---|---|---|---|"]
    train_ent = lambda name: evals_train.get(name, {}).get("macro", {}).get("ent_t1")   # noqa: E731
    reheat_rows = [read_metrics(os.path.dirname(p)) for p in reheated.values()]
    reheat_taus = "/".join(f"{rows[-1]['reheat/tau']:.3f}" for rows in reheat_rows)
    starts = {"plain": ("collapsed", [train_ent("collapsed")]),
              "hot": (f"collapsed, T={tau:.3f}", [train_ent("closed_form")]),
              "tsopsd": (f"TS-OPSD to H ({args.divergence}, tau {reheat_taus}, "
                         f"{'/'.join(str(len(rows)) for rows in reheat_rows)} steps)",
                         [train_ent(f"reheated_s{s}") for s in reheated]),
              "closed": (f"closed form tau={tau:.3f}", [train_ent("closed_form")]),
              "bonus": (f"collapsed, adaptive bonus to H", [train_ent("collapsed")])}
    for arm, dirs in arm_runs.items():
        names = [label_of(os.path.join(d, "final"), evals) for d in dirs]
        lines.append(f"| {arm} | {starts[arm][0]} | {fmt(starts[arm][1])} | "
                     f"{fmt([tail_mean(d, 'rollout/entropy_est') for d in dirs])} | "
                     f"{fmt([tail_mean(d, 'rollout/uniform_frac') for d in dirs])} | "
                     f"{fmt([acc(n, 'ent_t1') for n in names])} | {fmt([acc(n, f'avg@{k}') for n in names])} | "
                     f"{fmt([acc(n, f'pass@{k}') for n in names])} |")
    matched = [train_ent("closed_form")] + [train_ent(f"reheated_s{s}") for s in reheated]
    ok = all(v is not None and abs(v - target) <= 0.2 * target for v in matched)
    lines += ["", f"Matched: every reheated start (closed form / hot, TS-OPSD) within 20% of H: {yes(ok)} "
              f"({', '.join(f3(v) for v in matched)} vs {target:.3f})."]
    arm_tests = [t for path in glob.glob(os.path.join(eval_dir, "arms__*.json"))
                 for t in json.load(open(path))["tests"] if t["benchmark"] == "heldout"]
    if arm_tests:                               # every pair of arms: problems only, then with seed variance
        lines += ["", f"Arm A - arm B, held-out avg@{k} (95% CI, two-sided p). Problems only: paired bootstrap over "
                  f"problems of the seed-averaged accuracy, blind to training-seed variance. Seeds + problems: each "
                  f"resample also redraws each arm's seeds. Paired t: the per-seed differences (seed i of A against "
                  f"seed i of B).", "", "| A - B | problems only | seeds + problems | paired t over seeds |",
                  "|---|---|---|---|"]
        for t in arm_tests:
            lines.append(f"| {t['a']} - {t['b']} | {ci_text(t)} | {ci_text(t.get('seed_bootstrap'))} | "
                         f"{ci_text(t.get('seed_paired_t'))} |")
    lines += ["", "Checkpoints before continued RL (held-out):", "",
              f"| checkpoint | avg@{k} | pass@{k} | ent_t1 |", "|---|---|---|---|"]
    for name in ["start", "collapsed", "closed_form"] + [f"reheated_s{s}" for s in reheated]:
        lines.append(f"| {name} | {fmt([acc(name, f'avg@{k}')])} | {fmt([acc(name, f'pass@{k}')])} | "
                     f"{fmt([acc(name, 'ent_t1')])} |")
    cmp_paths = glob.glob(os.path.join(eval_dir, "compare__*.json"))
    if cmp_paths:
        c = json.load(open(cmp_paths[0]))
        ov, div = c["topk_overlap"], c["diversity"]
        lines += ["", f"Collapsed vs TS-OPSD-reheated ({c['n_tokens']} positions of the collapsed model's samples; "
                  f"diversity over {div['base']['n_groups']} prompts x {div['base']['n']} samples):", "",
                  "| | collapsed | reheated |", "|---|---|---|",
                  f"| token entropy at T=1 | {c['entropy']['base']:.3f} | {c['entropy']['other']:.3f} |",
                  f"| distinct answers per group | {div['base']['distinct_answers']:.2f} | {div['other']['distinct_answers']:.2f} |",
                  f"| accuracy | {div['base']['accuracy']:.3f} | {div['other']['accuracy']:.3f} |", "",
                  f"Effective temperature tau* = {c['effective_temperature']['tau']:.3f} (a temperature explains "
                  f"{c['effective_temperature']['explained']:.0%} of the KL between them); top-k overlap "
                  f"k=1/5/10: {ov['1']:.3f} / {ov['5']:.3f} / {ov['10']:.3f}; hidden-state CKA per layer: "
                  + ", ".join(f"{layer['name']} {layer['cka']:.4f}" for layer in c["layers"]) + "."]
    disp_paths = glob.glob(os.path.join(eval_dir, "displacement__*.json"))
    if disp_paths:
        d = json.load(open(disp_paths[0]))
        t0 = reheat_rows[0][-1]["reheat/tau"]
        lines += ["", f"Displacement in weight space (evaluate.py --displacement): Delta_high = reheated_s0 - collapsed "
                  f"(tau {t0:.3f}), Delta_low = sharpened - collapsed (the same distillation at tau {1 / t0:.3f}, as "
                  f"many steps):", "", "| | ours | paper (Qwen3-8B) |", "|---|---|---|",
                  f"| cos(Delta_low, Delta_high) (`cos_low_high`) | {d['cos_low_high']:.3f} | -0.878 |",
                  f"| reverse projection coefficient | {d['reverse_coef']:.3f} | 0.891 |",
                  f"| norm ratio ‖Delta_low‖ / ‖Delta_high‖ | {d['norm_ratio']:.3f} | - |"]
    if sweep:
        lines += sweep_section(args, *sweep, evals, evals_train, target, eval_dir, arm_runs["plain"],
                               os.path.join(collapse, "final"))
    lines += ["", f"Everything else (per-benchmark tables, the tests between arms, the collapsed vs reheated "
              f"analyses: entropy, effective temperature, top-k overlap, per-layer similarity, diversity) is in "
              f"[eval/results.md](eval/results.md); every curve in eval/plots/ (runs_entropy.png, runs_accuracy.png, "
              f"runs_uniform_groups.png, runs_entropy_trained.png, runs_response_len.png)."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return rg


def sweep_section(args, sweep, starts, eval_sweep, evals, evals_train, target, eval_dir, plain, collapsed) -> list[str]:
    """results.md's dose-response: per method and multiple of H, the reheat (teacher tau, steps), the entropy at the
    start of continued RL and the continued-RL held-out accuracy over seeds; the tests between TS-OPSD and the closed
    form at each target; and the figure (eval/plots/sweep.png) of accuracy against start entropy, one line a method."""
    import glob
    from common.stats import mean_ci
    k, evals_sweep = args.eval_k, read_evals(eval_sweep)

    def stat(values):               # mean and 95% half-width over seeds (0 with one seed)
        values = [v for v in values if v is not None]
        if not values:
            return None, 0.0
        m, lo, hi = mean_ci(values)
        return m, (0.0 if lo != lo else hi - m)

    def fmt(values):
        m, h = stat(values)
        return "n/a" if m is None else f"{m:.3f}" + (f" ± {h:.3f}" if h else "")

    def start_entropy(paths):       # a closed form is one checkpoint for every seed: counted once
        return [evals_train.get(label_of(p, evals_train), {}).get("macro", {}).get("ent_t1") for p in dict.fromkeys(paths)]

    def accuracy(dirs, key):
        return [evals_sweep.get(label_of(os.path.join(d, "final"), evals_sweep), {}).get("macro", {}).get(key)
                for d in dirs]

    def reheat_of(path):            # the reheat run's metrics, or the closed form's record
        if os.path.isfile(os.path.join(path, "closed_form.json")):
            return json.load(open(os.path.join(path, "closed_form.json")))["tau"], None
        rows = read_metrics(os.path.dirname(path))
        return rows[-1]["reheat/tau"], len(rows)

    points = {}                     # (method, f) -> start entropy, avg@k, pass@k: (mean, half-width) each
    lines = ["", f"## 3. Dose-response: reheated to 0.5, 1 and 2 x H, then {args.arm_steps} continued-DAPO steps", "",
             f"TS-OPSD with reverse KL (the script's default) and with forward KL (the demo's), both stopped at the "
             f"target as the tsopsd arm is (teacher at tau({args.teacher_factor:g} x target), stop on the mean of "
             f"{args.target_window} steps, at most {args.reheat_steps} steps), and the closed form at tau(target); "
             f"each then continued as the arms are (the 1 x H {args.divergence} and closed-form rows are the tsopsd "
             f"and closed arms of section 2). Start entropy: the starting checkpoint's token entropy at T=1 on its "
             f"own samples of the {args.entropy_problems} training problems (as H). Held-out: {args.eval_problems} "
             f"problems, k={k}, after the continued RL. Mean ± 95% t half-width over seeds.", "",
             f"| method | target | teacher tau | reheat steps | start entropy | continued RL: held-out avg@{k} | "
             f"pass@{k} | ent_t1 |", "|---|---|---|---|---|---|---|---|"]
    def row(key, label, target_text, tau_text, steps_text, start_paths, dirs):
        ent, avg, pas = start_entropy(start_paths), accuracy(dirs, f"avg@{k}"), accuracy(dirs, f"pass@{k}")
        points[key] = (stat(ent), stat(avg), stat(pas))
        lines.append(f"| {label} | {target_text} | {tau_text} | {steps_text} | {fmt(ent)} | {fmt(avg)} | {fmt(pas)} | "
                     f"{fmt(accuracy(dirs, 'ent_t1'))} |")

    row(("plain", 0), "plain (no reheat)", "-", "-", "-", [collapsed], plain)
    for f in SWEEP_FACTORS:
        for m in SWEEP:
            taus, steps = zip(*[reheat_of(p) for p in starts[m, f]])
            tau_text = f"{taus[0]:.3f}" if m == "closed" else "/".join(f"{t:.3f}" for t in taus)   # closed: one
            row((m, f), m, f"{f:g} x H = {f * target:.3f}", tau_text, "-" if m == "closed" else "/".join(map(str, steps)),
                starts[m, f], sweep[m, f])
    tests = [t for path in glob.glob(os.path.join(eval_sweep, "arms__*.json")) for t in json.load(open(path))["tests"]
             if t["benchmark"] == "heldout"]
    pairs = {(f"{m}_x{f:g}", f"closed_x{f:g}"): f for f in SWEEP_FACTORS for m in SWEEP if m != "closed"}
    chosen = [t for t in tests if (t["a"], t["b"]) in pairs]
    if chosen:
        lines += ["", f"TS-OPSD - closed form at each target, continued-RL held-out avg@{k} (95% CI, two-sided p; the "
                  f"three tests of section 2):", "", "| A - B | problems only | seeds + problems | paired t over seeds |",
                  "|---|---|---|---|"]
        lines += [f"| {t['a']} - {t['b']} | {ci_text(t)} | {ci_text(t.get('seed_bootstrap'))} | "
                  f"{ci_text(t.get('seed_paired_t'))} |" for t in chosen]
    start = evals.get("start", {}).get("macro", {})
    plot_sweep(points, target, (start.get(f"avg@{k}"), start.get(f"pass@{k}")), k,
               os.path.join(eval_dir, "plots", "sweep.png"))
    lines += ["", f"![continued-RL held-out avg@{k} and pass@{k} against the entropy at the start of continued RL, one "
              f"line per method, 95% bars over seeds](eval/plots/sweep.png)"]
    return lines


def plot_sweep(points: dict, target: float, start_acc: tuple, k: int, path: str):
    """Continued-RL held-out avg@k and pass@k (y) against start entropy (x), one line per method over the multiples
    of H, bars = 95% half-widths over seeds; the plain arm a point, H a dotted line, the start model dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for j, (ax, name) in enumerate(zip(axes, (f"avg@{k}", f"pass@{k}"))):
        for m in SWEEP:
            xs = [points[m, f] for f in SWEEP_FACTORS]
            ax.errorbar([p[0][0] for p in xs], [p[j + 1][0] for p in xs], xerr=[p[0][1] for p in xs],
                        yerr=[p[j + 1][1] for p in xs], marker="o", capsize=3, label=m)
        p = points["plain", 0]
        ax.errorbar([p[0][0]], [p[j + 1][0]], yerr=[p[j + 1][1]], marker="s", color="k", capsize=3, linestyle="none",
                    label="plain (no reheat)")
        ax.axvline(target, color="grey", linestyle=":", label="H (start model)")
        if start_acc[j] is not None:
            ax.axhline(start_acc[j], color="grey", linestyle="--", label="start model")
        ax.set_xlabel("token entropy at the start of continued RL (nats)")
        ax.set_ylabel(f"held-out {name} after continued RL")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
