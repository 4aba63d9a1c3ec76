"""Throughput of our Atari pipeline against the raw emulator and Gymnasium's wrappers, in one run.

Measures agent steps per second (1 step = 4 emulator frames) with uniformly random actions, resetting
at game over, for:

- ``raw``: ``ale_py.ALEInterface`` on one core, 4 ``act`` calls per step, no preprocessing at all
  (the physical limit of one core);
- ``gymnasium``: ``AtariPreprocessing`` + ``FrameStackObservation(4)`` on
  ``gymnasium.make("ALE/<Game>-v5", frameskip=1, repeat_action_probability=0)``;
- ``raw_preprocessed``: the same bare emulator plus the least work the protocol asks of any pipeline, done
  the plain way in-process on one core: two grayscale screens, their pixel-wise max, ``cv2.resize`` (area, one
  OpenCV thread) to 84x84 and the stack shift. ``ours_1`` does the same work and more (episode bookkeeping),
  but computes the resize with its own faster kernel (``dqn_atari.envs.screens``, the same pixels), so it can
  match or pass this;
- ``ale_vector_1`` / ``ale_vector_N``: ale-py's ``AtariVectorEnv`` alone (to show our wrapper's overhead);
- ``ours_1``: ``make_atari(game)`` with 1 env (in-process: the emulator and the preprocessing in this thread,
  see ``dqn_atari.envs.emulators``);
- ``ours_N``: ``make_atari(game, num_envs=N, num_threads=T)`` (default N=8, T=2): steps of all envs.

Prints figures and ratios (targets: ours_1 >= 0.8 x raw and >= 1.3 x gymnasium; ours_N >= 1.4 x raw),
then one JSON line, also written to ``results/benchmarks/bench_env.json``.
The machine may be shared: compare ratios, not absolute figures. Wall-clock ratios need an idle machine
(threads wait for cores under load); steps per CPU-second compare the work each setup does.

    .venv/bin/python scripts/bench_env.py [--game Breakout] [--seconds 3] [--rounds 6] \
        [--num-envs 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dqn_atari.envs import display_name, make_atari, resolve_game  # noqa: E402
from benchlib import finish, machine_info  # noqa: E402

FRAMES_PER_STEP = 4  # Nature 2015, Extended Data Table 1: action repeat 4


def bare_ale(rom: str):
    """A bare ALEInterface (seed 0, no sticky actions), its minimal action set and an action RNG."""
    import ale_py
    from ale_py import ALEInterface, roms

    ale = ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setInt("random_seed", 0)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(roms.get_rom_path(rom))
    return ale, ale.getMinimalActionSet(), np.random.default_rng(0)


def make_raw(rom: str):
    """One step = 4 ``act`` calls of a bare ALEInterface, reset at game over."""
    ale, actions, rng = bare_ale(rom)

    def step() -> int:
        action = actions[rng.integers(len(actions))]
        for _ in range(FRAMES_PER_STEP):
            ale.act(action)
        if ale.game_over():
            ale.reset_game()
        return 1

    return step, lambda: None


def make_raw_preprocessed(rom: str):
    """The bare emulator plus the protocol's least preprocessing, in-process on one core (see the docstring)."""
    import cv2

    cv2.setNumThreads(1)
    ale, actions, rng = bare_ale(rom)
    height, width = ale.getScreenDims()
    before_last, last = np.empty((height, width), np.uint8), np.empty((height, width), np.uint8)
    stack, resized = np.zeros((4, 84, 84), np.uint8), np.empty((84, 84), np.uint8)

    def step() -> int:
        action = actions[rng.integers(len(actions))]
        for frame in range(FRAMES_PER_STEP):
            ale.act(action)
            if frame == FRAMES_PER_STEP - 2:
                ale.getScreenGrayscale(before_last)
        ale.getScreenGrayscale(last)
        np.maximum(before_last, last, out=last)
        cv2.resize(last, (84, 84), dst=resized, interpolation=cv2.INTER_AREA)
        stack[:-1] = stack[1:]
        stack[-1] = resized
        if ale.game_over():
            ale.reset_game()
        return 1

    return step, lambda: None


def make_gymnasium(rom: str):
    """Gymnasium's AtariPreprocessing (noop 30, skip 4, max-pool, 84x84) + FrameStackObservation(4)."""
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    gym.register_envs(ale_py)
    env = gym.make(f"ALE/{display_name(rom)}-v5", frameskip=1, repeat_action_probability=0.0)
    env = FrameStackObservation(AtariPreprocessing(env), 4)
    env.reset(seed=0)
    env.action_space.seed(0)

    def step() -> int:
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
        return 1

    return step, env.close


def make_ale_vector(rom: str, num_envs: int, threads: int):
    """ale-py's AtariVectorEnv alone, same settings as ours (its own next-step autoreset): separates our
    wrapper's cost from the backend's."""
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv(rom, num_envs, num_threads=threads, noop_max=30, use_fire_reset=False,
                         reward_clipping=False)
    env.reset(seed=np.arange(num_envs))
    rng = np.random.default_rng(0)
    num_actions = env.single_action_space.n

    def step() -> int:
        env.step(rng.integers(0, num_actions, num_envs))
        return num_envs

    return step, env.close


def make_ours(rom: str, num_envs: int, threads: int):
    """``make_atari`` (nature2015 protocol); one call steps all ``num_envs`` envs."""
    env = make_atari(rom, num_envs=num_envs, seed=0, num_threads=threads)
    env.reset()
    rng = np.random.default_rng(0)

    def step() -> int:
        env.step(rng.integers(0, env.num_actions, num_envs))
        return num_envs

    return step, env.close


def measure(steppers: dict, seconds: float, rounds: int) -> dict[str, dict[str, float]]:
    """Agent steps/s of each stepper, interleaved in ``rounds`` slices of ``seconds / rounds`` each.

    Other processes share the machine, so load drifts during a run; interleaving exposes every setup to
    the same drift, and the best slice is each setup's figure (the median is reported too).
    """
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    cpu = {name: [0, 0.0] for name in steppers}  # steps, CPU seconds of the whole process (all threads)
    for step in steppers.values():
        for _ in range(20):  # warm-up: first calls allocate
            step()
    for _ in range(rounds):
        for name, step in steppers.items():
            steps, start, cpu_start = 0, time.perf_counter(), time.process_time()
            while (elapsed := time.perf_counter() - start) < seconds / rounds:
                steps += step()
            rates[name].append(steps / elapsed)
            cpu[name][0] += steps
            cpu[name][1] += time.process_time() - cpu_start
    return {
        name: {"best": max(r), "median": float(np.median(r)), "per_cpu_second": cpu[name][0] / cpu[name][1]}
        for name, r in rates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--seconds", type=float, default=3.0, help="per setup, over all rounds")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved slices per setup")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/benchmarks/bench_env.json")
    args = parser.parse_args()
    rom = resolve_game(args.game)

    built = {
        "raw": make_raw(rom),
        "raw_preprocessed": make_raw_preprocessed(rom),
        "gymnasium": make_gymnasium(rom),
        "ale_vector_1": make_ale_vector(rom, 1, 1),
        "ours_1": make_ours(rom, 1, 1),
        f"ale_vector_{args.num_envs}": make_ale_vector(rom, args.num_envs, args.threads),
        f"ours_{args.num_envs}": make_ours(rom, args.num_envs, args.threads),
    }
    try:
        stats = measure({name: step for name, (step, _) in built.items()}, args.seconds, args.rounds)
    finally:
        for _, close in built.values():
            close()
    sps = {name: s["best"] for name, s in stats.items()}
    ours_n = sps[f"ours_{args.num_envs}"]
    ratios = {
        "ours_1/raw": sps["ours_1"] / sps["raw"],
        "ours_1/gymnasium": sps["ours_1"] / sps["gymnasium"],
        f"ours_{args.num_envs}/raw": ours_n / sps["raw"],
        # no targets: one env against the plain pipeline, and our wrapper's own overhead
        "ours_1/raw_preprocessed": sps["ours_1"] / sps["raw_preprocessed"],
        "raw_preprocessed/raw": sps["raw_preprocessed"] / sps["raw"],
        "ours_1/ale_vector_1": sps["ours_1"] / sps["ale_vector_1"],
        f"ours_{args.num_envs}/ale_vector_{args.num_envs}": ours_n / sps[f"ale_vector_{args.num_envs}"],
    }
    targets = {"ours_1/raw": 0.8, "ours_1/gymnasium": 1.3, f"ours_{args.num_envs}/raw": 1.4}

    print(
        f"{display_name(rom)}, random actions, {args.seconds:g} s per setup "
        f"in {args.rounds} interleaved slices; agent steps/s (1 step = {FRAMES_PER_STEP} frames): "
        "best slice, median slice, and per CPU-second of the process (all threads; robust to load):"
    )
    for name, value in sps.items():
        median, per_cpu = stats[name]["median"], stats[name]["per_cpu_second"]
        print(f"  {name:<16} {value:8.0f} best  {median:8.0f} median  {per_cpu:8.0f} per CPU-s")
    for name, value in ratios.items():
        if name in targets:
            verdict = "ok" if value >= targets[name] else "BELOW TARGET"
            print(f"  {name:<24} {value:5.2f}  (target >= {targets[name]})  {verdict}")
        else:
            print(f"  {name:<24} {value:5.2f}")

    result = {
        "benchmark": "bench_env",
        "game": display_name(rom),
        "seconds": args.seconds,
        "num_envs": args.num_envs,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_second": {k: round(v, 1) for k, v in sps.items()},
        "steps_per_second_median": {k: round(v["median"], 1) for k, v in stats.items()},
        "steps_per_cpu_second": {k: round(v["per_cpu_second"], 1) for k, v in stats.items()},
        "load_average_1min": os.getloadavg()[0],
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": targets,
        "machine": machine_info(),
    }
    finish(result, args.out)


if __name__ == "__main__":
    main()
