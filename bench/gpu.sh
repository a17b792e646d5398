#!/usr/bin/env bash
# The benchmark on a lent GPU machine (an H200 through the device tool): no network there, so nothing is
# installed; its image already has torch, torchvision, h5py, typer, rich, scikit-learn, joblib, matplotlib, Pillow.
# Generates 12,000 JPEGs of 500x375, runs bench/bench.py on CUDA (CPU and nvJPEG decoding), and torchrun over every
# GPU (with one GPU, row 8 compares one process with another), writes its results. Row 13 runs the head sweeps on
# the GPU (train-head's --device auto picks CUDA: logreg's torch solver and the linear head's wide module run there)
# on synthetic map caches of 1k, 4k and 16k rows, against today's code (scikit-learn, on the CPU) at 1k; row 15
# loads `serve` on CUDA. About 10 minutes on an H200. Usage: bash bench/gpu.sh [--quick] [results folder]
# (default: $OUT, else bench/results). --quick: rows 1, 3 and 13 alone (bench/gpu_quick.py), about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
results="${1:-${OUT:-bench/results}}"
python3 -c "import torch, torchvision, h5py, typer, rich, sklearn, joblib, matplotlib, PIL" \
  || { echo "gpu.sh: a required package is missing from this machine's python3" >&2; exit 1; }
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if [ "$quick" = 1 ]; then exec python3 bench/gpu_quick.py "$results"; fi
data=/tmp/vggcache-jpegs
[ -d "$data" ] || python3 -c "from pathlib import Path; import sys; sys.path.insert(0, 'bench'); import bench; bench.generated_jpegs(Path('$data'), 12000)"
gpus=$(nvidia-smi -L | wc -l)  # row 8: torchrun over every GPU of the machine against one GPU
python3 bench/bench.py --device cuda --data "$data" --weights none --out "$results" --processes "$gpus"
