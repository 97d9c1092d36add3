#!/usr/bin/env bash
# The GPU checks, as one script: CUDA tests, then training and inference throughput with bf16
# autocast and channels_last, each as a ratio to the bf16 matmul peak measured in the same process.
# Usage: bash bench/gpu.sh [python]   (the python must have torch with CUDA; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== tests that need CUDA (and the model suite on this machine)"
$PY -m pytest -q -p no:cacheprovider -o addopts="" -m "cuda or not slow" \
  tests/unet_model tests/pipeline/test_runtime.py || status=1

echo "== U-Net throughput, bf16 autocast, channels_last"
for args in "--base 64 --batch 32" "--base 64 --batch 64" "--base 64 --batch 64 --compile" "--base 32 --batch 64 --compile"; do
  $PY bench/model.py --device cuda --dtype bf16 --size 256 $args || status=1
done
echo "== the same, fp32 (TF32) for reference"
$PY bench/model.py --device cuda --dtype fp32 --size 256 --base 64 --batch 32 || status=1
exit $status
