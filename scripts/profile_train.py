"""Where one faithful training run's time goes, on any device: the training loop's Python profile over timed
agent steps with learning on (real Atari, the Nature config), then one update split into its pieces (each
timed alone, the device synchronised around it), then torch's profiler over a few updates.

    python scripts/profile_train.py [--game Breakout] [--device auto] [--steps 1000] [--warm 1000] [--k 1]
        [--compile | --cuda-graph]

With --k K, seeds 1..K train together in one process (dqn_atari.agent_group), as bench_train.py's (c); the
update pieces are then those of seed 1 alone.

A diagnostic for the speed work (README, "Speed"), not a benchmark: its figures are not ratios and nothing is
written; bench_train.py measures the speed itself.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dqn_atari.cuda_graphs import Graphed  # noqa: E402
from dqn_atari.train import train_together  # noqa: E402
from benchlib import warmed_runs  # noqa: E402


def timed(fn, device: torch.device, repeats: int = 50) -> float:
    """Median milliseconds of ``fn()``, the device synchronised before and after each call."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def cuda_variants(agent, b, device: torch.device) -> None:
    """The whole update (loss, backward, optimizer step) with cuDNN's autotuner on, then through the graphed path
    of cuda_graph=true (inputs copied in, one graph replay, outputs cloned; the first calls warm up and capture,
    and the median leaves them out): median ms, as above. Trains the agent."""
    torch.backends.cudnn.benchmark = True
    print(f"  {'update, cudnn.benchmark on':30s} {timed(lambda: agent._step(b), device):8.3f}")
    graphed = Graphed(agent._step)
    try:
        print(f"  {'update, as a CUDA graph':30s} {timed(lambda: graphed(b), device):8.3f}")
    except Exception as exc:  # a diagnostic: say why, and go on
        print(f"  CUDA graph capture failed: {exc!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=1000, help="profiled agent steps with learning on")
    parser.add_argument("--warm", type=int, default=1000, help="random steps, then as many learning, first")
    parser.add_argument("--k", type=int, default=1, help="runs trained together")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        warmed, trainers = warmed_runs(args.game, Path(tmp), args.device, 100_000, args.warm, args.steps, args.k,
                                       (f"compile={args.compile}", f"cuda_graph={args.cuda_graph}"))
        resumed_at = warmed[0].counters.wall_time  # the loop's clock where the profiled part resumes
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.runcall(train_together, trainers, interrupt_at_step=2 * args.warm + args.steps)
        trainer = trainers[0]
        done = trainer.counters.agent_step - 2 * args.warm
        elapsed = trainer.counters.wall_time - resumed_at  # the loop's own clock: no resume, no checkpoint
        print(f"\n{args.k} run(s) x {done} agent steps: {args.k * done / (time.perf_counter() - t0):.0f} agent "
              f"steps/s with resume and checkpoint, {args.k * done / elapsed:.0f} by the loop's clock "
              f"({'compile' if args.compile else 'cuda_graph' if args.cuda_graph else 'eager'}, {trainer.agent.device}; slowed by the profiler)")
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())

        agent, replay = trainer.agent, trainer.replay
        device = agent.device
        batch = replay.sample(32)
        b = agent._to_device(batch)
        pieces = {"replay.sample(32)": lambda: replay.sample(32), "batch to device": lambda: agent._to_device(batch)}

        def forward():
            return agent._loss(agent.online, agent.target, b, **agent.loss_args)[0]

        def backward():
            agent.optimizer.zero_grad(set_to_none=True)
            forward().backward()

        pieces.update({"loss (forward)": forward, "loss + backward": backward, "optimizer step": agent.optimizer.step,
                       "whole update (agent.update)": lambda: agent.update(batch)})
        print("one update, piece by piece (median ms, synchronised):")
        for name, fn in pieces.items():
            print(f"  {name:30s} {timed(fn, device):8.3f}")
        obs = trainer.obs
        print(f"  {'act (batch of 1, to host)':30s} {timed(lambda: agent.greedy(obs), device):8.3f}")
        if device.type == "cuda":
            cuda_variants(agent, b, device)

        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(20):
                agent.update(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print("\ntorch profiler, 20 updates, by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        if device.type == "cuda":
            print("by self CUDA time:")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
