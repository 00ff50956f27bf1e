#!/usr/bin/env bash
# Run probes one after another, each under the heavy lock: lines of "NAME flags..." on stdin.
cd /work/main && source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
while read -r name flags; do
  [ -z "$name" ] && continue
  echo "== $name $flags $(date +%T)"
  flock /tmp/heavy.lock python bench/probes/probe.py $name $flags || echo "FAILED $name"
  echo "== done $name $(date +%T)"
done
