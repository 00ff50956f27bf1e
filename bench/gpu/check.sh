#!/usr/bin/env bash
# The GPU checks of issues 3 and 4 as ONE command for a lent machine (one H100 or H200; ~6-8 min there):
#   here:    bash bench/gpu/wheels.sh                                   # once: .whl/ (datasets, math-verify, liger)
#   device:  run(command="bash bench/gpu/check.sh", carry=[".whl"], timeout_s=560)
#   by hand on any CUDA machine with requirements.txt installed:  bash bench/gpu/check.sh
# Writes to $OUT (the device tool's folder) or bench/results/gpu/, and prints a summary:
#   env.txt           GPU, driver, torch / transformers versions
#   kl_gpu.json       bench/bench_kl.py in bf16 at the Qwen3-4B shape (16384 tokens x 2560 x 151936): naive,
#                     eager, compiled (ours) and Liger-Kernel, with the GEMM floor measured in the same run
#   rl/ reheat/       rl_dapo.py then reheat_tsopsd.py on the shipped tiny model on CUDA: bf16 compute, the
#                     compiled head, HF engine when vLLM is absent (the GPU image has none, and vLLM's wheel
#                     with its torch is far over what a call may carry): metrics.jsonl, config.json
#   rollout_gpu.json  bench/bench_rollout.py on CUDA (the engines that import)
#   log.txt           everything printed
# CHECK_QUICK=1 shrinks every part (a dry run of the script itself, also on CPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
M=assets/tiny_math/model D=assets/tiny_math/data
if [ "${CHECK_QUICK:-0}" = 1 ]; then
    RL_STEPS=2 RH_STEPS=1 KL="--shapes 256x64x4096 --no-qwen-shape --iters 1" RB="--prompts 4 --n 2 --repeats 1"
else
    RL_STEPS=20 RH_STEPS=5 KL="--shapes 16384x2560x151936 --iters 5" RB="--prompts 64 --n 16 --max-tokens 128"
fi
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

stamp env
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  $PY -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null || echo "vllm: not installed (HF engine)"
} | tee "$OUT/env.txt"

stamp "rl_dapo.py on the tiny model ($RL_STEPS steps)"
$PY rl_dapo.py --model $M --data $D/train.jsonl --val-data $D/test.jsonl --val-max-problems 64 --prompt-style plain \
    --group-size 8 --prompts-per-step 16 --gen-batch-prompts 32 --ppo-mini-batch 16 --max-response-len 64 \
    --overlong-buffer 16 --lr 1e-4 --steps $RL_STEPS --val-every 0 --out "$OUT" --run-name rl
echo "rl_dapo exit $?"

stamp "reheat_tsopsd.py on its result ($RH_STEPS steps)"
$PY reheat_tsopsd.py --ckpt "$OUT/rl/final" --tau 1.5 --data $D/train.jsonl --prompt-style plain \
    --max-response-len 64 --steps $RH_STEPS --lr 3e-4 --out "$OUT" --run-name reheat
echo "reheat_tsopsd exit $?"
# only the records come back (the device tool returns at most 8 files): metrics.jsonl and config.json of each run
rm -rf "$OUT"/{rl,reheat}/{checkpoints,final,*.py,command.txt,env.json,code.diff}

stamp "bench_kl.py ($KL)"
$PY bench/bench_kl.py $KL --out "$OUT/kl_gpu.json" --timeout 240
echo "bench_kl exit $?"

stamp "bench_rollout.py ($RB)"
$PY bench/bench_rollout.py --model $M --data $D/test.jsonl $RB --json "$OUT/rollout_gpu.json"
echo "bench_rollout exit $?"

stamp summary
$PY - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
for run in ("rl", "reheat"):
    path = os.path.join(out, run, "metrics.jsonl")
    if not os.path.exists(path):
        print(f"{run}: no metrics"); continue
    rows = [json.loads(l) for l in open(path) if l.strip()]
    keys = [k for k in ("rollout/accuracy", "train/entropy_t1", "train/entropy", "rollout/logprob_diff_mean",
                        "rollout/logprob_diff_max", "reheat/student_entropy", "reheat/divergence", "time/step", "time/rollout",
                        "time/update", "time/weight_sync", "perf/rollout_tokens_per_s", "val/accuracy") if k in rows[-1]]
    print(f"{run}: {len(rows)} steps")
    for k in keys:
        print(f"  {k:32s} first {rows[0].get(k, float('nan')):10.4g}   last {rows[-1][k]:10.4g}")
for name in ("kl_gpu.json", "rollout_gpu.json"):
    path = os.path.join(out, name)
    if os.path.exists(path):
        data = json.load(open(path))
        if "table" in data:
            print(data["table"])
        for r in data.get("rows", []):
            print(f"rollout {r['engine']}: {r['tokens_per_s']:.0f} tok/s, start-up {r['startup_s']:.1f} s, "
                  f"sync {r['sync_s']:.4f} s = {r['sync_share_of_step']:.1%} of a generate+sync step")
PY
stamp done
