"""The paper's whole experiment on a shipped tiny math model, on a CPU, in minutes.

The same three scripts that run Qwen3-8B on 8 GPUs, run here as subprocesses on a 640k-parameter Qwen3
that was supervised on noisy worked arithmetic (assets/tiny_math: `python -m common.tiny` rebuilds it):

  1. collapse   rl_dapo.py from the tiny model until its token entropy has fallen (a step budget)
  2. arms       from the collapsed checkpoint, equal continued-RL budgets for each of
                  plain      continued DAPO
                  hot        continued DAPO sampling at a higher rollout temperature (the paper's baseline)
                  tsopsd     reheat_tsopsd.py (tau 1.5, frozen teacher), then continued DAPO
                  closed     the closed-form reheat (final norm / tau), then continued DAPO
  3. evaluate   evaluate.py on the held-out problems for every checkpoint (avg@k, pass@k), and the
                analyses of collapsed vs reheated (entropy, effective temperature, top-k overlap,
                hidden-state similarity), plus the curves of every run
  4. results    OUT/results.md (one table, every number read from the runs' own outputs) and OUT/plots

    python demo.py                      # ~10 minutes on 2 CPU cores, 1 seed
    python demo.py --seeds 3            # three seeds per arm: mean and 95% CI in results.md
    python demo.py --quick              # a few steps of everything (what CI runs)

Learning rates are ~50x the paper's 2e-6: the tiny model needs them to move in tens of steps. What a toy can
show: the mechanics (entropy falls under RL, reheating raises it, RL continues from each start) and how the
arms compare on this task; not whether the paper's claim holds for Qwen3 on competition math.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from common.cli import arg, parse_args

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class Args:
    out: str = arg("runs/demo", "output folder (results.md, plots/, run directories)")
    model: str = arg(os.path.join("assets", "tiny_math", "model"), "starting policy (the shipped tiny math model)")
    data: str = arg(os.path.join("assets", "tiny_math", "data"), "folder with train.jsonl and test.jsonl")
    seeds: int = arg(1, "seeds per arm (the collapse run uses seed 0)")
    quick: bool = arg(False, "tiny budgets for a smoke test (CI)")
    collapse_steps: int = arg(60, "DAPO steps of the collapse stage")
    arm_steps: int = arg(30, "continued-DAPO steps of every arm")
    reheat_steps: int = arg(8, "TS-OPSD steps before the tsopsd arm's continued RL")
    tau: float = arg(1.5, "reheat temperature (paper: 1.5); also the closed form's")
    hot_temperature: float = arg(1.5, "rollout temperature of the 'hot' arm")
    lr: float = arg(1e-4, "DAPO learning rate (50x the paper's 2e-6: a 640k-parameter model needs it)")
    reheat_lr: float = arg(3e-4, "TS-OPSD learning rate")
    group_size: int = arg(8, "samples per prompt")
    prompts_per_step: int = arg(16, "groups per DAPO step")
    max_response_len: int = arg(64, "max tokens per response")
    eval_k: int = arg(8, "samples per held-out problem")
    eval_problems: int = arg(256, "held-out problems evaluated")
    update_readme: bool = arg(False, "also copy results.md into README.md (between the demo-results markers)")
    engine: str = arg("hf", "rollout engine for every stage: hf or vllm (see README: hf is faster at this size)",
                      choices=("hf", "vllm"))


def run(cmd: list[str], log: str):
    """Run one stage as its own process (as a user would), streaming its progress bar, keeping a log."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith("[") or "it/s" in line or "s/it" in line:
                sys.stdout.write(line)
                sys.stdout.flush()
        if proc.wait():
            raise SystemExit(f"stage failed (exit {proc.returncode}): see {log}")


def main(argv=None):
    args = parse_args(Args, argv, description=__doc__)
    if args.quick:
        args.collapse_steps, args.arm_steps, args.reheat_steps = 3, 2, 2
        args.eval_problems, args.eval_k, args.prompts_per_step = 32, 4, 8
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
    t_start = time.time()
    py = sys.executable
    common_rl = ["--data", train, "--prompt-style", "plain", "--rollout-engine", args.engine,
                 "--group-size", str(args.group_size), "--prompts-per-step", str(args.prompts_per_step),
                 "--gen-batch-prompts", str(2 * args.prompts_per_step), "--max-gen-batches", "4",
                 "--ppo-mini-batch", str(args.prompts_per_step), "--micro-batch-tokens", "512",
                 "--max-response-len", str(args.max_response_len), "--overlong-buffer", str(args.max_response_len // 4),
                 "--lr", str(args.lr), "--warmup-steps", "1", "--val-data", test, "--val-max-problems", "64",
                 "--no-compile", "--out", runs, "--save-every", "0", "--keep-last", "1", "--grade-workers", "0"]
    if args.engine == "vllm":
        common_rl += ["--vllm-kv-cache-gib", "0.25"]

    def rl(name, model, steps, seed, extra=()):
        run_dir = os.path.join(runs, name)
        if not os.path.isdir(os.path.join(run_dir, "final")):
            shutil.rmtree(run_dir, ignore_errors=True)
            run([py, "rl_dapo.py", "--model", model, "--steps", str(steps), "--seed", str(seed), "--run-name", name,
                 "--val-every", str(max(steps // 3, 1)), *common_rl, *extra], os.path.join(logs, name + ".log"))
        return run_dir

    # ---- 1. collapse
    print(f"[demo] 1/4 collapse: DAPO from {args.model} for {args.collapse_steps} steps", flush=True)
    collapse = rl("collapse", args.model, args.collapse_steps, 0)
    collapsed = os.path.join(collapse, "final")

    # ---- 2. arms
    closed = os.path.join(runs, "closed_form")
    if not os.path.isdir(closed):
        run([py, "reheat_tsopsd.py", "--ckpt", collapsed, "--tau", str(args.tau), "--closed-form", "--out", closed],
            os.path.join(logs, "closed_form.log"))
    arm_runs = {"plain": [], "hot": [], "tsopsd": [], "closed": []}
    reheated = {}
    for seed in range(args.seeds):
        print(f"[demo] 2/4 arms, seed {seed}", flush=True)
        arm_runs["plain"].append(rl(f"plain_s{seed}", collapsed, args.arm_steps, seed))
        arm_runs["hot"].append(rl(f"hot_s{seed}", collapsed, args.arm_steps, seed,
                                  ["--rollout-temperature", str(args.hot_temperature)]))
        reheat_dir = os.path.join(runs, f"reheat_s{seed}")
        if not os.path.isdir(os.path.join(reheat_dir, "final")):
            shutil.rmtree(reheat_dir, ignore_errors=True)
            run([py, "reheat_tsopsd.py", "--ckpt", collapsed, "--tau", str(args.tau), "--steps", str(args.reheat_steps),
                 "--data", train, "--prompt-style", "plain", "--rollout-engine", args.engine,
                 "--group-size", str(args.group_size), "--prompts-per-step", str(args.prompts_per_step),
                 "--max-response-len", str(args.max_response_len), "--lr", str(args.reheat_lr), "--seed", str(seed),
                 "--micro-batch-tokens", "512", "--no-compile", "--grade-workers", "0", "--out", runs,
                 "--run-name", f"reheat_s{seed}"] + (["--vllm-kv-cache-gib", "0.25"] if args.engine == "vllm" else []),
                os.path.join(logs, f"reheat_s{seed}.log"))
        reheated[seed] = os.path.join(reheat_dir, "final")
        arm_runs["tsopsd"].append(rl(f"tsopsd_s{seed}", reheated[seed], args.arm_steps, seed))
        arm_runs["closed"].append(rl(f"closed_s{seed}", closed, args.arm_steps, seed))

    # ---- 3. evaluate: accuracy of every checkpoint, arms over seeds, collapsed vs reheated, curves
    print("[demo] 3/4 evaluate every checkpoint on the held-out set, compare collapsed vs reheated", flush=True)
    ckpts = {"start": args.model, "collapsed": collapsed, "closed_form": closed}
    ckpts |= {f"reheated_s{s}": p for s, p in reheated.items()}
    arms = {arm: [os.path.join(d, "final") for d in dirs] for arm, dirs in arm_runs.items()}
    eval_dir = os.path.join(out, "eval")
    run([py, "evaluate.py", "--ckpt", *[f"{k}={v}" for k, v in ckpts.items()],
         "--arms", *[f"{arm}={','.join(paths)}" for arm, paths in arms.items()],
         "--compare", f"collapsed={collapsed}", f"reheated={reheated[0]}",
         "--runs", f"collapse={collapse}", *[f"{os.path.basename(d)}={d}" for ds in arm_runs.values() for d in ds],
         *[f"reheat_s{s}={os.path.dirname(p)}" for s, p in reheated.items()],
         "--benchmarks", f"heldout={test}", "--max-problems", str(args.eval_problems), "--k", str(args.eval_k),
         "--prompt-style", "plain", "--max-tokens", str(args.max_response_len), "--temperature", "1.0",
         "--rollout-engine", args.engine, "--compare-problems", "64", "--compare-n", str(args.group_size),
         "--analysis-tokens", "2048", "--grade-workers", "0", "--out", eval_dir]
        + (["--vllm-kv-cache-gib", "0.25"] if args.engine == "vllm" else []), os.path.join(logs, "evaluate.log"))

    # ---- 4. results
    write_results(out, args, ckpts, arm_runs, reheated, eval_dir, time.time() - t_start)
    if args.update_readme:
        update_readme(os.path.join(out, "results.md"))
    print(f"\n[demo] done in {(time.time() - t_start) / 60:.1f} min. Results: {os.path.join(out, 'results.md')}; "
          f"details and plots: {eval_dir} (results.md, plots/); run directories: {runs}", flush=True)


def update_readme(results_md: str, readme: str = os.path.join(ROOT, "README.md")):
    """Put a demo's results.md into the README verbatim, so no number there is typed by hand."""
    start, end = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
    text = open(readme).read()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    body = open(results_md).read().replace("# TS-OPSD demo: results", "").strip()
    body = body.replace("](eval/", "](runs/demo/eval/")
    head, rest = text.split(start, 1)
    with open(readme, "w") as f:
        f.write(head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])


def label_of(ckpt_path: str, evals: dict) -> str:
    """evaluate.py's label for a checkpoint it was given as a bare path (arms are)."""
    for label, data in evals.items():
        if os.path.abspath(data.get("checkpoint", "")) == os.path.abspath(ckpt_path):
            return label
    return ckpt_path


def write_results(out, args, ckpts, arm_runs, reheated, eval_dir, seconds):
    """results.md: every number read from the runs' metrics.jsonl and evaluate.py's JSON, none typed in."""
    from common.runlog import read_metrics
    from common.stats import mean_ci
    import glob
    evals = {}                                   # label -> evaluate.py's results JSON (results/<label>__<settings>.json)
    for path in glob.glob(os.path.join(eval_dir, "results", "*.json")):
        data = json.load(open(path))
        evals[data.get("label") or os.path.basename(path).split("__")[0]] = data

    def acc(name, key):
        e = evals.get(name, {})
        return e.get("macro", {}).get(key)

    def entropy(run_dir, first: bool):
        rows = [r for r in read_metrics(run_dir) if "train/entropy_t1" in r]
        return (rows[0] if first else rows[-1])["train/entropy_t1"] if rows else None

    def fmt(values):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        m, lo, hi = mean_ci(values)
        return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

    k = args.eval_k
    lines = ["# TS-OPSD demo: results", "",
             f"Command: `python demo.py {' '.join(sys.argv[1:])}`; seeds: {args.seeds}; engine: {args.engine}; "
             f"wall time {seconds / 60:.1f} min on {os.cpu_count()} CPU cores.", "",
             f"Held-out: {args.eval_problems} problems, k={k} samples each at T=1. Entropy: mean token entropy at T=1 "
             f"of the policy on its training rollouts (first and last step of the arm's RL). With several seeds: "
             f"mean [95% CI].", "",
             f"| arm | start checkpoint | entropy start -> end | held-out avg@{k} | pass@{k} |",
             "|---|---|---|---|---|"]
    starts = {"plain": "collapsed", "hot": f"collapsed, T={args.hot_temperature}", "tsopsd": f"TS-OPSD tau={args.tau}",
              "closed": f"closed form tau={args.tau}"}
    for arm, dirs in arm_runs.items():
        names = [label_of(os.path.join(d, "final"), evals) for d in dirs]
        lines.append(f"| {arm} | {starts[arm]} | {fmt([entropy(d, True) for d in dirs])} -> "
                     f"{fmt([entropy(d, False) for d in dirs])} | {fmt([acc(n, f'avg@{k}') for n in names])} | "
                     f"{fmt([acc(n, f'pass@{k}') for n in names])} |")
    arm_tests = [t for path in glob.glob(os.path.join(eval_dir, "arms__*.json"))
                 for t in json.load(open(path))["tests"] if t["benchmark"] == "heldout"]
    if arm_tests:                               # every pair of arms: problems only, then with seed variance
        def ci(t):
            return f"{t['diff']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], p = {t['p_value']:.4f}" if t else "-"
        lines += ["", f"Arm A - arm B, held-out avg@{k} (95% CI, two-sided p). Problems only: paired bootstrap over "
                  f"problems of the seed-averaged accuracy, blind to training-seed variance. Seeds + problems: each "
                  f"resample also redraws each arm's seeds. Paired t: the per-seed differences (seed i of A against "
                  f"seed i of B).", "", "| A - B | problems only | seeds + problems | paired t over seeds |",
                  "|---|---|---|---|"]
        for t in arm_tests:
            lines.append(f"| {t['a']} - {t['b']} | {ci(t)} | {ci(t.get('seed_bootstrap'))} | "
                         f"{ci(t.get('seed_paired_t'))} |")
    lines += ["", "Checkpoints before continued RL:", "", f"| checkpoint | held-out avg@{k} | pass@{k} |", "|---|---|---|"]
    for name in ["start", "collapsed", "closed_form"] + [f"reheated_s{s}" for s in reheated]:
        lines.append(f"| {name} | {fmt([acc(name, f'avg@{k}')])} | {fmt([acc(name, f'pass@{k}')])} |")
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
    lines += ["", f"Everything else (per-benchmark tables, the tests between arms, the collapsed vs reheated "
              f"analyses: entropy, effective temperature, top-k overlap, per-layer similarity, diversity) is in "
              f"[eval/results.md](eval/results.md); curves in eval/plots/."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
