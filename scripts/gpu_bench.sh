#!/usr/bin/env bash
# The GPU figures of the speed work (README, "Speed"), in one command on a GPU machine whose Python has torch
# but not ale-py or gymnasium (as the GPU machines lent to this project's sessions: Python 3.12, no internet).
# Prepare the wheels on a machine with internet access first (`make gpu-wheels`, into .whl/, ignored by git),
# then run this on the GPU machine, from a copy of the repository that includes .whl/:
#
#     bash scripts/gpu_bench.sh            # figures and logs in $OUT (default results/benchmarks/gpu)
#
# 1. the CUDA tests: the CUDA replay store against the NumPy one, CUDA graphs against plain updates;
# 2. training speed on real Atari with learning on (scripts/bench_train.py) in each of MODES (default "graph",
#    never measured yet; also "eager", measured once, and "compile"): one faithful run, the env alone, a plain
#    single-file style loop, and K runs in one process;
# 3. the CUDA paths no test reaches, in `reproduce --smoke` of C51 on Pong, seeds 1 and 2 in one process, with
#    SMOKE_ARGS (default cuda_graph=true replay.on_device=true; SMOKE= skips it): evaluations with graphs, the
#    replay on the GPU, checkpoints, the report;
# 4. PONG_SECONDS (default 65; 0 skips it) of a real Nature DQN training run on Pong through
#    `python -m dqn_atari train $PONG_ARGS` (default cuda_graph=true), evaluations included, whose train.csv
#    gives the learning-phase agent steps/s of the whole pipeline and so the wall time of a 10M-frame run; the
#    run directory comes back as a tarball.
# Every step has its own time limit, about 575 s in all with the defaults (the device takes 600 s per command), so
# a step that fails or hangs leaves the others' results. On a CPU machine, `DEVICE=cpu MODES=eager SMOKE_ARGS=
# PONG_ARGS= K=2 STEPS=200 WARM=200 PONG_SECONDS=60` rehearses the whole script (CUDA graphs need a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/benchmarks/gpu}
DEVICE=${DEVICE:-cuda}
K=${K:-16} STEPS=${STEPS:-1500} WARM=${WARM:-1000} MODES=${MODES-graph}
SMOKE=${SMOKE-1} SMOKE_ARGS=${SMOKE_ARGS-cuda_graph=true replay.on_device=true}
PONG_SECONDS=${PONG_SECONDS:-65} PONG_ARGS=${PONG_ARGS-cuda_graph=true}
PONG_RUNS=${PONG_RUNS:-/tmp/gpu_bench_runs}  # a second call on the same machine resumes the Pong run from here
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    timeout 45 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
timeout 30 python3 -c "import ale_py, gymnasium, torch; assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'torch sees no GPU'" || {
    echo "needs ale-py, gymnasium and a CUDA torch: make gpu-wheels, and bring .whl/ along"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"; } | tee "$OUT/gpu.csv"
if [ "$DEVICE" != cpu ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_replay.py tests/test_cuda_graphs.py -k cuda 2>&1 | tee "$OUT/cuda_tests.log"
fi
for mode in $MODES; do
    case $mode in eager) flag= limit=165 ;; graph) flag=--cuda-graph limit=165 ;; compile) flag=--compile limit=190 ;;
        *) echo "unknown mode $mode (eager, graph, compile)"; continue ;; esac
    timeout -k 20 "$limit" python3 scripts/bench_train.py --device "$DEVICE" $flag --k "$K" --steps "$STEPS" --warm "$WARM" \
        --capacity 100000 --rounds 1 --out "$OUT/bench_train_$mode.json" 2>&1 | tee "$OUT/bench_train_$mode.log"
done
if [ -n "$SMOKE" ]; then
    timeout -k 20 120 python3 -m dqn_atari reproduce --smoke --variant c51 --game Pong --seeds "1 2" --parallel \
        --no-progress device="$DEVICE" $SMOKE_ARGS 2>&1 | tee "$OUT/smoke.log"
fi
if [ "$PONG_SECONDS" -gt 0 ]; then
    # SIGTERM: the run checkpoints and stops; -k: killed if that checkpoint (up to GBs of replay) takes too long.
    timeout -k 20 "$PONG_SECONDS" python3 -m dqn_atari train --no-progress configs/nature_dqn.yaml env.game=Pong \
        device="$DEVICE" runs_root="$PONG_RUNS" $PONG_ARGS 2>&1 | tee "$OUT/pong.log"
    tar -C "$PONG_RUNS" -czf "$OUT/pong_run.tar.gz" --exclude='checkpoint*' --exclude='*.safetensors' --exclude='*.npy' .
fi
ls -l "$OUT"
