#!/usr/bin/env bash
# GPU check for a workstation with an NVIDIA GPU (about 5 minutes; most of it is the venv on a fresh clone):
#   1. the venv (`make setup`: the pinned requirements.lock; its torch wheel is a CUDA build),
#   2. `nvidia-smi -L` and what torch sees,
#   3. a tiny `dvc repro` (the end-to-end test's config) in a temporary copy with `train.device: cuda`,
#   4. lite0 train-step throughput at 48 px, batch 32: CUDA with AMP, CUDA fp32, CPU fp32; one table.
# Fails (exit 2) with a message when there is no GPU. Usage: bash tests/gpu/gpu_check.sh [pipeline|throughput]
set -euo pipefail
cd "$(dirname "$0")/../.."
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: no NVIDIA driver on this machine, so no GPU to check." >&2
    echo "           (CPU runs need nothing: train.device: auto falls back to the CPU.)" >&2
    exit 2
fi
if ! nvidia-smi -L; then
    echo "gpu_check: nvidia-smi -L failed: the driver sees no GPU." >&2
    exit 2
fi

make setup
.venv/bin/python tests/gpu/gpu_check.py "${1:-all}"
