"""Issue 13 probes: can RL itself collapse the shipped tiny model within the demo's time budget?

One probe = rl_dapo.py with demo.py's collapse-stage flags plus the probe's overrides, then evaluate.py
(hf, k=8, 128 held-out problems, plain prompts, 64 tokens) on its final policy; the start model is evaluated
once into the same cache. Appends one record per probe to bench/probes/probes.json.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=2 python bench/probes/probe.py NAME [rl_dapo flags ...]
"""
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "bench", "probes")
TRAIN, TEST = "assets/tiny_math/data/train.jsonl", "assets/tiny_math/data/test.jsonl"
START = "assets/tiny_math/model"
DEMO = {"--data": TRAIN, "--prompt-style": "plain", "--rollout-engine": "hf", "--group-size": "8",
        "--prompts-per-step": "16", "--gen-batch-prompts": "32", "--max-gen-batches": "4", "--ppo-mini-batch": "16",
        "--micro-batch-tokens": "512", "--max-response-len": "64", "--overlong-buffer": "16", "--lr": "1e-4",
        "--warmup-steps": "1", "--no-compile": None, "--save-every": "0", "--keep-last": "1",
        "--grade-workers": "0", "--steps": "60", "--seed": "0"}


def evaluate(ckpts: dict) -> dict:
    out = os.path.join(HERE, "eval")
    cmd = [sys.executable, "evaluate.py", "--ckpt", *[f"{k}={v}" for k, v in ckpts.items()],
           "--benchmarks", f"heldout={TEST}", "--max-problems", "128", "--k", "8", "--prompt-style", "plain",
           "--max-tokens", "64", "--temperature", "1.0", "--rollout-engine", "hf", "--grade-workers", "0", "--out", out]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = {}
    for path in glob.glob(os.path.join(out, "results", "*.json")):
        d = json.load(open(path))
        label = d.get("label") or os.path.basename(path).split("__")[0]
        if label in ckpts:
            res[label] = {k: d["macro"].get(k) for k in ("avg@8", "pass@8")}
    return res


def summarize(run_dir: str) -> dict:
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    ent = [r["train/entropy_t1"] for r in rows if "train/entropy_t1" in r]
    last = rows[-10:]
    seen = sum(r["rollout/groups_seen"] for r in last)
    filt = sum(r["rollout/groups_filtered"] for r in last)
    acc = [r["rollout/accuracy"] for r in rows]
    return {"steps": len(rows), "entropy_first": ent[0], "entropy_last": ent[-1],
            "entropy_last5_mean": sum(ent[-5:]) / len(ent[-5:]), "entropy_ratio": ent[-1] / ent[0],
            "uniform_first": rows[0]["rollout/groups_filtered"] / rows[0]["rollout/groups_seen"],
            "uniform_last10": filt / max(seen, 1),
            "acc_first": acc[0], "acc_last10": sum(acc[-10:]) / len(acc[-10:]),
            "no_update_steps": sum(1 for r in rows if "train/entropy_t1" not in r),
            "gen_batches_last10": sum(r["rollout/gen_batches"] for r in last) / len(last),
            "clipped_frac_last": rows[-1]["rollout/clipped_frac"],
            "len_last": rows[-1]["rollout/response_len_mean"],
            "entropy_curve": [round(e, 4) for e in ent[::max(len(ent) // 20, 1)]],
            "uniform_curve": [round(r["rollout/groups_filtered"] / r["rollout/groups_seen"], 3)
                              for r in rows[::max(len(rows) // 20, 1)]]}


def main():
    name, extra = sys.argv[1], sys.argv[2:]
    flags = dict(DEMO)
    i = 0
    while i < len(extra):                       # overrides: --flag value, or a bare --flag
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            flags[extra[i]] = extra[i + 1]; i += 2
        else:
            flags[extra[i]] = None; i += 1
    runs = os.path.join(HERE, "runs")
    run_dir = os.path.join(runs, name)
    cmd = [sys.executable, "rl_dapo.py", "--model", START, "--out", runs, "--run-name", name]
    for k, v in flags.items():
        cmd += [k] + ([v] if v is not None else [])
    t0 = time.time()
    with open(os.path.join(HERE, f"{name}.log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    wall = time.time() - t0
    t0 = time.time()
    ev = evaluate({"start": START, name: os.path.join(run_dir, "final")})
    rec = {"name": name, "flags": {k: v for k, v in flags.items() if DEMO.get(k, "absent") != v},
           "rl_wall_s": round(wall, 1), "eval_wall_s": round(time.time() - t0, 1),
           "threads": os.environ.get("OMP_NUM_THREADS"), **summarize(run_dir),
           "pass8_start": ev["start"]["pass@8"], "pass8_end": ev[name]["pass@8"],
           "avg8_start": ev["start"]["avg@8"], "avg8_end": ev[name]["avg@8"]}
    path = os.path.join(HERE, "probes.json")
    allrec = json.load(open(path)) if os.path.exists(path) else []
    allrec = [r for r in allrec if r["name"] != name] + [rec]
    json.dump(allrec, open(path, "w"), indent=1)
    print(json.dumps({k: v for k, v in rec.items() if not k.endswith("_curve")}))


if __name__ == "__main__":
    main()
