# dqn_atari: the user's front door. Every target installs what it needs first (make install).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

GAME ?= Breakout
VARIANT ?= nature_dqn
SEEDS ?= 1 2 3
FRAMES ?=
PARALLEL ?=
ARGS ?=
# make smoke: Pong and one seed unless GAME / SEEDS are given on the command line.
SMOKE_GAME := $(if $(filter command line environment,$(origin GAME)),$(GAME),Pong)
SMOKE_SEEDS := $(if $(filter command line environment,$(origin SEEDS)),$(SEEDS),1)
# make her: bit counts and training episodes per run (empty: dqn_atari/her.py's default, 4000)
BITS ?= 5 10 15 20 25
EPISODES ?=
# make sweep / make status
GAMES ?= $(GAME)
VARIANTS ?= $(VARIANT)
BACKEND ?= local
SWEEP ?=
MAX_PARALLEL ?=
SWEEP_OPTS ?=

.PHONY: install test test-fast reproduce smoke ablations tables plots sweep status bench bench-env bench-replay bench-train gpu-wheels faults her

install: $(STAMP)

# torch==2.13.0 first: the CPU build on this machine's disk; the package itself only asks for torch>=2.5,
# so a GPU user's own torch build is kept.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow"

# PARALLEL=1: all SEEDS in one process (one batched network evaluation and update per step for all of them),
# the same runs as training them one after the other: bit for bit where they take turns (Atari on CPU), to float32
# rounding where batched (README, "K runs in one process").
reproduce: install
	$(PY) -m dqn_atari reproduce --game "$(GAME)" --variant "$(VARIANT)" --seeds "$(SEEDS)" --frames "$(FRAMES)" $(if $(PARALLEL),--parallel) -- $(ARGS)

smoke: install
	$(PY) -m dqn_atari reproduce --smoke --game "$(SMOKE_GAME)" --variant "$(VARIANT)" --seeds "$(SMOKE_SEEDS)" --frames "$(FRAMES)" -- $(ARGS)

# Rainbow and its six ablations (Hessel et al. 2018, Fig. 3) on one game, then the figure and table in
# results/reports/ablations/<game>.{png,md}.
ablations: install
	$(PY) -m dqn_atari ablations --game "$(GAME)" --seeds "$(SEEDS)" --frames "$(FRAMES)" -- $(ARGS)

tables: install
	$(PY) -m dqn_atari tables

plots: install
	$(PY) -m dqn_atari plots

sweep: install
	$(PY) -m dqn_atari sweep --games "$(GAMES)" --seeds "$(SEEDS)" --variants "$(VARIANTS)" --frames "$(FRAMES)" --backend "$(BACKEND)" --name "$(SWEEP)" --max-parallel "$(MAX_PARALLEL)" $(SWEEP_OPTS) -- $(ARGS)

# STATUS_OPTS="--runs-root DIR" for a sweep whose runs went elsewhere (its file is in DIR's sibling sweeps/).
STATUS_OPTS ?=
status: install
	$(PY) -m dqn_atari status --name "$(SWEEP)" $(STATUS_OPTS)

# Results go to results/benchmarks/local/ (not in git), so that a quick `make bench` leaves the committed figures in
# results/benchmarks/*.json as they are; each of those records the command that made it. BENCH_OUT=results/benchmarks
# replaces them.
BENCH_OUT ?= results/benchmarks/local
bench-env: install
	$(PY) scripts/bench_env.py --out $(BENCH_OUT)/bench_env.json

bench-replay: install
	$(PY) scripts/bench_replay.py --out $(BENCH_OUT)/bench_replay.json

# The training bench times runs with compile=true (the faster faithful update); BENCH_TRAIN_ARGS= for eager.
BENCH_TRAIN_ARGS ?= --compile
bench-train: install
	$(PY) scripts/bench_train.py $(BENCH_TRAIN_ARGS) --out $(BENCH_OUT)/bench_train.json

bench: bench-env bench-replay bench-train

# Wheels for a GPU machine whose Python 3.12 has torch but no ale-py or gymnasium (scripts/gpu_bench.sh installs
# them from .whl/ there). The versions are this environment's, so both machines run the same emulator.
GPU_WHEELS := ale-py gymnasium farama-notifications
gpu-wheels: install
	rm -rf .whl && $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl \
		$$(for p in $(GPU_WHEELS); do echo "$$p==$$($(PY) -m pip show $$p | sed -n 's/^Version: //p')"; done)

# Hindsight experience replay's bit-flipping experiment (Andrychowicz et al. 2017, Fig. 1): DQN with and without
# HER for each number of bits and seed, then results/reports/her/bitflip.{png,md,csv}. About 4 minutes on 2 idle cores (2026-12-04).
her: install
	$(PY) -m dqn_atari.her --bits "$(BITS)" --seeds "$(SEEDS)" --episodes "$(EPISODES)" -- $(ARGS)

# Kill real training runs at random moments (some during checkpoint writes), resume them, and compare with
# uninterrupted runs of the same seed. TRIALS=20 by default.
faults: install
	$(PY) scripts/fault_injection.py --trials $(or $(TRIALS),20) --task both --seed 0
