#!/usr/bin/env bash
# Everything the CUDA path needs proven, in one run on a GPU machine (about 3 minutes):
# the test suite (its cuda cases run there), the headline command on real MNIST, the same
# with --compile, and the benchmark. Usage: bash bench/gpu_check.sh PATH/TO/DATA [OUT_DIR]
# where PATH/TO/DATA holds MNIST/raw/. Logs go to OUT_DIR (default: a temporary folder).
set -uo pipefail
data=${1:?usage: bash bench/gpu_check.sh PATH/TO/DATA [OUT_DIR]}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
MNIST_DATA_DIR="$data" python -m pytest -q -rs 2>&1 | tee "$out/tests.txt"
python mnist_train.py --epochs 5 --device cuda --data-dir "$data" \
  --save "$out/model.pth" --checkpoint "$out/checkpoint.pt" 2>&1 | tee "$out/headline.txt"
python mnist_train.py --epochs 5 --device cuda --compile --data-dir "$data" \
  --save "$out/model-compile.pth" --checkpoint "$out/checkpoint-compile.pt" 2>&1 | tee "$out/compile.txt"
python bench/benchmark.py --device cuda --data-dir "$data" 2>&1 | tee "$out/bench.txt"
echo "logs in $out"
