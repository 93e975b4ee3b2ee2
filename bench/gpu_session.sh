#!/usr/bin/env bash
# Everything the CUDA path needs checked, as one command for a lent GPU machine (the device tool):
# the GPU tests, then bench/gpu_throughput.py at the issue's size (extra arguments go to it).
# Logs go to $OUT (the device tool's return folder) or /tmp/mlstm-gpu.
#
#   bash bench/gpu_session.sh                      # all models, fp16 and bf16
#   bash bench/gpu_session.sh --skip per-step      # leave out the slow per-step baseline
#
# Runs from the source tree with the machine's own PyTorch (no install): the GPU tests and the
# benchmark import only torch and mlstm_trainer's model code.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/trainer:$PWD/platform:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/mlstm-gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# --confcutdir: the repository's tests/conftest.py loads the S3 test server, not installed there.
python3 -m pytest --confcutdir=tests/gpu -p no:cacheprovider -q -rs tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 bench/gpu_throughput.py "$@" 2>&1 | tee "$OUT/gpu_throughput.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc, benchmark exit $bench_rc"
exit $(( tests_rc != 0 ? tests_rc : bench_rc ))
