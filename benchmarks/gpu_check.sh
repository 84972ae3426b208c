#!/usr/bin/env bash
# One check of every GPU path, for the day a CUDA machine is lent (under 8 minutes):
#   dml train a few steps over NCCL (one process per visible GPU), bf16 and fp16 autocast
#   with the partial-FC head, faiss-GPU search against faiss-CPU, ONNX Runtime CUDA latency
#   of the exported model, and GPU memory and time per step of the head at 1M classes.
# Prints one table and writes JSON (default benchmarks/results/gpu_check.json).
# On a machine without a usable CUDA GPU it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [OUT.json]      (PYTHON=... to choose the interpreter)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; fi
out="${1:-$here/results/gpu_check.json}"

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' 2>/dev/null; then
    echo "gpu_check: needs a CUDA GPU (torch sees none here); nothing checked"
    exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
work="$(mktemp -d -t gpu_check.XXXXXX)"
trap 'rm -rf "$work"' EXIT
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$python" "$here/gpu_check.py" --work "$work" --out "$out"
