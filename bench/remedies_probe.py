"""Does each objective-side entropy remedy of rl_dapo.py do what it is for? A probe on the demo's tiny model.

From the demo's entropy-collapsed checkpoint (demo.py's collapse stage: DAPO on the easy problems until most groups
are uniform), 30 continued-DAPO steps per arm, the demo's arm settings (lr 1e-4, groups of 8, 16 prompts per
step), one seed:

    plain       continued DAPO (the demo's plain arm)
    bonus       --entropy-coef 0.5 (the collapsed toy's token entropy is ~0.02 nats, where the entropy's gradient
                is small: 0.05 moved nothing measurable)
    adaptive    --entropy-target 0.12 --entropy-coef-delta 0.05 (the start model's held-out entropy is ~0.13;
                TRL's delta 0.005 reaches only 0.1 in the ~20 updates a collapsed run makes in 30 steps)
    clip_cov    --policy-loss clip_cov --cov-ratio 0.02 --clip-cov-lb 0.02 (on the toy |cov| < ~0.2: the paper's
                band (1, 5) is empty, and 2e-4 of a step's ~4k tokens would pick 1 token)
    kl_cov      --policy-loss kl_cov --cov-ratio 0.02 --ppo-mini-batch 8 (KL-Cov needs two mini-batches)
    top20       --top-entropy-quantile 0.2 (80/20)

Then evaluate.py on the held-out problems (avg@8, pass@8, own-sample entropy at T=1) for every arm. Prints a
table and writes bench/results/remedies_probe.json. Not a test: the numbers are one seed of a toy.

    python bench/remedies_probe.py                    # ~20 min on 2 cores (collapse ~6, arms ~8, evaluate ~4)
    python bench/remedies_probe.py --collapsed runs/demo/runs/collapse/final   # reuse a demo's collapsed model
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = {
    "plain": [],
    "bonus": ["--entropy-coef", "0.5"],
    "adaptive": ["--entropy-target", "0.12", "--entropy-coef-delta", "0.05"],
    "clip_cov": ["--policy-loss", "clip_cov", "--cov-ratio", "0.02", "--clip-cov-lb", "0.02"],
    "kl_cov": ["--policy-loss", "kl_cov", "--cov-ratio", "0.02", "--ppo-mini-batch", "8"],
    "top20": ["--top-entropy-quantile", "0.2"],
}


def run(cmd, log):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"failed: {' '.join(cmd)} (see {log})")
    print(f"[probe] {os.path.basename(log)[:-4]}: {time.time() - t0:.0f} s", flush=True)


def main():
    import demo
    from common.runlog import read_metrics
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/remedies_probe", help="output folder")
    p.add_argument("--collapsed", default="", help="a collapsed checkpoint (default: run the demo's collapse stage)")
    p.add_argument("--steps", type=int, default=30, help="continued-DAPO steps per arm")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS), help="arms to run")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "remedies_probe.json"))
    a = p.parse_args()
    d = demo.Args()                                   # the demo's settings, not retyped
    out = os.path.abspath(a.out)
    runs, logs = os.path.join(out, "runs"), os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    train = demo.training_split(os.path.join(ROOT, d.data, "train.jsonl"), d.train_split,
                                os.path.join(out, "data", "train.jsonl"))
    test = os.path.join(ROOT, d.data, "test.jsonl")
    py = sys.executable
    rl = ["--data", train, "--prompt-style", "plain", "--rollout-engine", d.engine, "--group-size", str(d.group_size),
          "--prompts-per-step", str(d.prompts_per_step), "--gen-batch-prompts", str(2 * d.prompts_per_step),
          "--max-gen-batches", "4", "--ppo-mini-batch", str(d.prompts_per_step), "--micro-batch-tokens", "512",
          "--max-response-len", str(d.max_response_len), "--overlong-buffer", str(d.max_response_len // 4),
          "--no-compile", "--out", runs, "--save-every", "0", "--keep-last", "1", "--grade-workers", "0",
          "--val-every", "0"]
    collapsed = a.collapsed
    if not collapsed:
        collapsed = os.path.join(runs, "collapse", "final")
        if not os.path.isdir(collapsed):
            run([py, "rl_dapo.py", "--model", os.path.join(ROOT, d.model), "--steps", str(d.collapse_steps),
                 "--seed", "0", "--run-name", "collapse", "--lr", str(d.collapse_lr), "--warmup-steps",
                 str(d.collapse_warmup), *rl], os.path.join(logs, "collapse.log"))
    for name in a.arms:
        if not os.path.isdir(os.path.join(runs, name, "final")):
            run([py, "rl_dapo.py", "--model", collapsed, "--steps", str(a.steps), "--seed", "0", "--run-name", name,
                 "--lr", str(d.lr), "--warmup-steps", "1", *rl, *ARMS[name]], os.path.join(logs, name + ".log"))
    eval_dir = os.path.join(out, "eval")
    run([py, "evaluate.py", "--ckpt", f"collapsed={collapsed}", *[f"{n}={os.path.join(runs, n, 'final')}" for n in a.arms],
         "--benchmarks", f"heldout={test}", "--max-problems", str(d.eval_problems), "--k", str(d.eval_k),
         "--prompt-style", "plain", "--max-tokens", str(d.max_response_len), "--temperature", "1.0",
         "--rollout-engine", d.engine, "--entropy-samples", str(d.eval_k), "--hf-batch-size", "256",
         "--grade-workers", "0", "--out", eval_dir], os.path.join(logs, "evaluate.log"))
    evals = demo.read_evals(eval_dir)
    k = d.eval_k

    def tail(name, key, n=5):
        vals = [r[key] for r in read_metrics(os.path.join(runs, name)) if key in r][-n:]
        return sum(vals) / len(vals) if vals else None
    rows = []
    for name in ["collapsed", *a.arms]:
        macro = evals.get(name, {}).get("macro", {})
        row = {"arm": name, "flags": " ".join(ARMS.get(name, [])), "heldout_ent_t1": macro.get("ent_t1"),
               f"avg@{k}": macro.get(f"avg@{k}"), f"pass@{k}": macro.get(f"pass@{k}")}
        if name != "collapsed":
            row |= {"rollout_entropy_last5": tail(name, "rollout/entropy_est"),
                    "train_entropy_t1_last5": tail(name, "train/entropy_t1"),
                    "uniform_frac_last5": tail(name, "rollout/uniform_frac")}
        rows.append(row)
    cols = ["arm", "rollout_entropy_last5", "train_entropy_t1_last5", "uniform_frac_last5", "heldout_ent_t1",
            f"avg@{k}", f"pass@{k}"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)   # noqa: E731
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"rows": rows, "steps": a.steps, "collapsed": collapsed, "machine": f"{os.cpu_count()} cores"}, f,
                  indent=1)


if __name__ == "__main__":
    main()
