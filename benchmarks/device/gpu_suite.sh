#!/usr/bin/env bash
# Run ON the lent GPU machine (issue 5, item 8), from the repository root, with the wheels that
# fetch_wheels.sh put in .whl/ carried along:
#   run(command="bash benchmarks/device/gpu_suite.sh", carry=[".whl", "runs/bench"], timeout_s=600)
# The cells go through launcher=processes (no Ray there); the checkout runs from source (PYTHONPATH). Each
# finished cell is appended to runs/bench/gpu_1b_<profile>/cells.jsonl at once, and that folder comes back
# under $OUT/bench. If a call ends before the last cell, copy it back to runs/bench/ here and call again:
# finished cells are skipped. The report, CSV, JSONL and plots come back under $OUT/results (commit them to benchmarks/results/).
# SUITE=cpu_smoke checks the script itself on a machine without a GPU (into /tmp/out when OUT is unset).
set -uo pipefail
suite="${SUITE:-gpu_1b}"
out="${OUT:-/tmp/out}"
mkdir -p "$out/results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run benchmarks/device/fetch_wheels.sh here first"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 FTCLUSTER_CACHE=/tmp/ftcluster-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv | tee "$out/nvidia-smi.csv" \
  || echo "no nvidia-smi here"
python3 - <<'PY' | tee "$out/versions.txt"
import importlib.metadata as m
for name in ("torch", "deepspeed", "transformers", "peft", "accelerate", "hydra-core", "datasets", "flash-attn"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
PY
# Leaves time for the copy back within one 600-second call.
timeout "${SUITE_TIMEOUT_S:-540}" python3 -m ftcluster.cli bench suite="$suite" launcher=processes --results "$out/results" 2>&1 | tee "$out/bench.log"
status=${PIPESTATUS[0]}
mkdir -p "$out/bench" && cp -r runs/bench/"$suite"_* "$out/bench/" 2>/dev/null
echo "bench exit status: $status"
exit "$status"
