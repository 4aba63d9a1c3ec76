#!/usr/bin/env bash
# The GPU figures of the speed work (README, "Speed"), in one command on a GPU machine whose Python has torch
# but not ale-py or gymnasium (as the GPU machines lent to this project's sessions: Python 3.12, no internet).
# Prepare the wheels on a machine with internet access first (`make gpu-wheels`, into .whl/, ignored by git),
# then run this on the GPU machine, from a copy of the repository that includes .whl/:
#
#     bash scripts/gpu_bench.sh            # figures and logs in $OUT (default results/benchmarks/gpu)
#
# It checks the CUDA replay store against the NumPy one, then times training on real Atari with learning on
# (scripts/bench_train.py) eagerly and with compile=true: one faithful run, the env alone, the plain loop and
# K runs in one process. Every step has a time limit, 9 minutes in all at most (an estimate: it has not run on
# a GPU yet), so a step that fails or hangs leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/benchmarks/gpu}
K=${K:-16}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 60 python3 -c "import ale_py, gymnasium, torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || {
    echo "needs ale-py, gymnasium and a CUDA torch: make gpu-wheels, and bring .whl/ along"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_replay.py -k cuda 2>&1 | tee "$OUT/cuda_tests.log"
for mode in eager compile; do
    flag=$([ "$mode" = compile ] && echo --compile)
    timeout 180 python3 scripts/bench_train.py --device cuda $flag --k "$K" --steps 1500 --warm 1000 \
        --capacity 100000 --rounds 1 --out "$OUT/bench_train_$mode.json" 2>&1 | tee "$OUT/bench_train_$mode.log"
done
ls -l "$OUT"
