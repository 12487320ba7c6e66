#!/usr/bin/env bash
# Everything the CUDA path needs proven, in one run on a GPU machine (about 5 minutes on an H200):
# the test suite (its cuda cases run there, bench/cuda_graph.py's among them), the headline
# command on real MNIST (drawing its misread test digits, --mistakes), the same under torchrun
# (one process, NCCL), a torchrun restart after a kill, --predict on the GPU, and the benchmark
# (its way (d) replays each step as a CUDA graph).
# Usage: bash bench/gpu_check.sh PATH/TO/DATA [OUT_DIR]
# where PATH/TO/DATA holds MNIST/raw/. Logs go to OUT_DIR (default: a temporary folder);
# weights and checkpoints to a temporary folder beside them, so OUT_DIR holds only logs and
# the picture of the mistakes.
set -uo pipefail
data=${1:?usage: bash bench/gpu_check.sh PATH/TO/DATA [OUT_DIR]}
out=${2:-$(mktemp -d)}
files=$(mktemp -d)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
train() {  # train LOG NAME [FLAGS...]: the headline command, its files named NAME
  local log=$1 name=$2
  shift 2
  "$@" --epochs 5 --device cuda --data-dir "$data" --save "$files/$name.pth" \
    --checkpoint "$files/$name.pt" 2>&1 | tee "$out/$log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
MNIST_DATA_DIR="$data" python -m pytest -q -rs 2>&1 | tee "$out/tests.txt"
train headline.txt model python mnist_train.py --mistakes "$out/mistakes.png"
train torchrun.txt model-torchrun python -m torch.distributed.run --standalone --nproc_per_node=1 mnist_train.py
# torchrun's restart on NCCL: one process, killed (SIGKILL) once epoch 2 is checkpointed; torchrun
# restarts it, it resumes this job's checkpoint and ends with exit status 0 (the last line says).
python -m torch.distributed.run --standalone --nproc_per_node=1 --max-restarts=1 mnist_train.py --epochs 5 \
  --device cuda --data-dir "$data" --save "$files/restart.pth" --checkpoint "$files/restart.pt" > "$out/restart.txt" 2>&1 &
job=$!
for _ in $(seq 1 600); do grep -q "^epoch  2/" "$out/restart.txt" && break; sleep 0.2; done
pkill -9 -n -f "mnist_train.py --epochs 5 --device cuda --data-dir $data --save $files/restart.pth"  # the worker
wait $job
echo "exit status $?" >> "$out/restart.txt"
# --predict on the GPU: three test digits drawn as a user's PNG files, read with the headline model.
python -c "import sys, test_mnist_train as t, torchvision
test = torchvision.datasets.MNIST(sys.argv[1], train=False)
for i in range(3):
    t.save_as_users_file(test.data[i], f'{sys.argv[2]}/digit{i}-is-{int(test.targets[i])}.png', 4, (90, 140), (0.3, 0.6), True, 'L PNG')
" "$data" "$files"
python mnist_train.py --predict "$files"/digit*.png --device cuda --load "$files/model.pth" 2>&1 | tee "$out/predict.txt"
python bench/benchmark.py --device cuda --data-dir "$data" 2>&1 | tee "$out/bench.txt"
echo "logs in $out, weights in $files"
