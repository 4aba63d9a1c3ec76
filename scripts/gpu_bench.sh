#!/usr/bin/env bash
# The GPU figures of the speed work (README, "Speed"), in one command on a lent GPU machine whose Python has
# torch but not ale-py or gymnasium. Prepare the wheels here first (`make gpu-wheels`, into .whl/, ignored by
# git), then run this there from the repository root with .whl carried; it takes about 8 minutes:
#
#     bash scripts/gpu_bench.sh            # figures and logs in $OUT (default results/benchmarks/gpu)
#
# It checks the CUDA replay store against the NumPy one, then times training on real Atari with learning on
# (scripts/bench_train.py) eagerly and with compile=true: one faithful run, the env alone, the plain loop and
# K runs in one process. Each step has its own time limit, so one that fails or hangs leaves the others' results.
set -uo pipefail
OUT=${OUT:-results/benchmarks/gpu}
K=${K:-16}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
python3 -c "import ale_py, gymnasium, torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || {
    echo "needs ale-py, gymnasium and a CUDA torch: make gpu-wheels here, and carry .whl"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_replay.py -k cuda 2>&1 | tee "$OUT/cuda_tests.log"
for mode in eager compile; do
    flag=$([ "$mode" = compile ] && echo --compile)
    timeout 250 python3 scripts/bench_train.py --device cuda $flag --k "$K" --steps 2000 --warm 1000 \
        --capacity 100000 --rounds 1 2>&1 | tee "$OUT/bench_train_$mode.log"
    [ "${PIPESTATUS[0]}" = 0 ] && cp results/benchmarks/bench_train.json "$OUT/bench_train_$mode.json"
done
ls -l "$OUT"
