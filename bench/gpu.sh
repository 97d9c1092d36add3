#!/usr/bin/env bash
# The GPU checks, as one script: CUDA tests, then U-Net throughput (bf16 autocast, channels_last)
# as ratios to the bf16 matmul peak measured in the same process, a real training run of the
# default configuration on the demo data, and batch inference throughput.
# Usage: bash bench/gpu.sh [python]   (the python must have torch with CUDA; default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== tests that need CUDA (and the model suite on this machine)"
$PY -m pytest -q -p no:cacheprovider -o addopts="" -m "cuda or not slow" \
  tests/unet_model tests/pipeline/test_runtime.py || status=1

echo "== U-Net throughput, bf16 autocast, channels_last"
for args in "--base 64 --batch 64" "--base 64 --batch 64 --compile" "--base 32 --batch 64"; do
  $PY bench/model.py --device cuda --dtype bf16 --size 256 $args || status=1
done

if $PY -c "import monai, nibabel, pydicom, highdicom" 2>/dev/null; then
  echo "== training: the default configuration on the demo data, 90 s budget (Dice, slices/s)"
  $PY -m bench.demo_dice /tmp/gpu-dice --budget-minutes 1.5 || status=1
  echo "== batch inference: end-to-end volumes/min over the model-only bound"
  $PY bench/predict.py --device cuda --cases 6 --size 112 || status=1
else
  echo "(monai/nibabel/pydicom/highdicom missing here: training and inference benches skipped)"
fi
exit $status
