"""Rollout throughput, vLLM vs HF generate, and the cost of a weight sync, on a tiny Qwen3.

    python bench/bench_rollout.py [--model DIR] [--prompts 32] [--n 8] [--max-tokens 64] [--repeats 3]

Each engine runs in its own process (vLLM's in-process engine and HF's threads would otherwise share state),
on the same prompts and budgets. Reported per engine: engine start-up, generation time and tokens/s (median
of --repeats after one warm-up call), weight-sync time, and the sync's share of a step made of one generation
plus one sync. Prints a table and writes JSON (bench/results/rollout_<device>.json). Ratios from one run are
comparable; absolute CPU times are not (machine load varies).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from common.data import load_problems, render_prompt
    from common.dist import init_distributed, shard_model
    from common.rollout import make_engine
    info = init_distributed(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = shard_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), info, "none")
    prompts = [render_prompt(p, tok, "plain") for p in load_problems(args.data, limit=args.prompts)]
    t0 = time.time()
    engine = make_engine(args.engine, model=model, model_path=args.model, tokenizer=tok, info=info, max_model_len=512,
                         seed=0, vllm_kv_cache_gib=0.5 if info.device.type == "cpu" else None)
    startup = time.time() - t0
    gen_times, tokens, sync_times = [], [], []
    for r in range(args.repeats + 1):
        t0 = time.time()
        groups = engine.generate(prompts, n=args.n, temperature=1.0, max_tokens=args.max_tokens,
                                 seeds=[r * 1000 + i for i in range(len(prompts))])
        dt = time.time() - t0
        t0 = time.time()
        engine.sync_weights(model)
        ds = time.time() - t0
        if r:                                            # the first call warms caches up
            gen_times.append(dt)
            sync_times.append(ds)
            tokens.append(sum(len(s.response_ids) for g in groups for s in g))
    gen, sync = statistics.median(gen_times), statistics.median(sync_times)
    print(json.dumps({"engine": engine.name, "startup_s": startup, "generate_s": gen,
                      "tokens_per_call": statistics.median(tokens), "tokens_per_s": statistics.median(tokens) / gen,
                      "sync_s": sync, "sync_share_of_step": sync / (gen + sync)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF checkpoint (default: a fresh tiny fixture)")
    ap.add_argument("--data", default="", help="prompts (default: the fixture's test split)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per generation call")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=64, help="max response tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per engine (after one warm-up)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated engines")
    ap.add_argument("--json", default="", help="output JSON (default bench/results/rollout_<device>.json)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.engine = args.worker
        return worker(args)
    if not args.model:
        from common.tiny import write_fixture
        paths = write_fixture(tempfile.mkdtemp(prefix="bench_rollout_"), seed=0, n_train=200, n_test=max(args.prompts, 64))
        args.model, args.data = paths["model"], paths["test"]
    rows = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--worker", engine, "--model", args.model, "--data", args.data,
               "--prompts", str(args.prompts), "--n", str(args.n), "--max-tokens", str(args.max_tokens),
               "--repeats", str(args.repeats), "--device", args.device]
        env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in res.stdout.splitlines() if l.startswith("{")]
        if res.returncode or not line:
            print(f"{engine}: failed\n{res.stderr[-2000:]}")
            continue
        rows.append(json.loads(line[-1]))
    import torch
    device = "cuda" if (args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()) else "cpu"
    print(f"\nrollout benchmark: {args.prompts} prompts x {args.n} samples x <= {args.max_tokens} tokens, {device}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"{'engine':8} {'startup s':>10} {'generate s':>11} {'tokens/s':>10} {'sync s':>8} {'sync share':>11}")
    for r in rows:
        print(f"{r['engine']:8} {r['startup_s']:10.2f} {r['generate_s']:11.3f} {r['tokens_per_s']:10.0f} "
              f"{r['sync_s']:8.4f} {r['sync_share_of_step']:11.1%}")
    if len(rows) == 2:
        print(f"vLLM / HF tokens/s: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")
    out = args.json or os.path.join(ROOT, "bench", "results", f"rollout_{device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    with open(out, "w") as f:
        json.dump({"config": vars(args), "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                      "torch": torch.__version__, "gpu": gpu,
                                                      "omp_threads": os.environ.get("OMP_NUM_THREADS")},
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
