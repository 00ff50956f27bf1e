#!/usr/bin/env bash
# Wheels that the lent GPU machines' image lacks (it has torch, transformers, numpy, pandas, tqdm, matplotlib,
# huggingface_hub, triton; no datasets, math-verify, liger-kernel), for Python 3.12 / x86-64, into .whl/
# (ignored by git). The device tool carries .whl/ and bench/gpu/check.sh installs it there into /tmp/site.
#   bash bench/gpu/wheels.sh          # here, once (needs PyPI; ~50 MB, the limit a call may carry is 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
PIP="python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl"
for n in 17 27 28 34; do PIP="$PIP --platform manylinux_2_${n}_x86_64"; done
PIP="$PIP --platform manylinux2014_x86_64 --platform any"
# the versions of install/requirements-cpu.lock (what CI runs), and the KL benchmark's Liger-Kernel
$PIP datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 pyarrow==26.0.1 fsspec==2026.9.0 \
     math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5
du -sh .whl && ls .whl
