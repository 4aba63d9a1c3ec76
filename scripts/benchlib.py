"""What the benchmark scripts share: the machine they ran on, the closing JSON line plus its file, and the warmed-up
faithful runs that bench_train.py times and profile_train.py profiles."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from importlib.metadata import version
from pathlib import Path


def machine_info(packages: tuple[str, ...] = ("ale-py", "gymnasium", "numpy", "torch")) -> dict[str, object]:
    """CPU model, cores, GPU (if torch sees one) and package versions, for the benchmark's JSON."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, object] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    for package in packages:
        try:
            info[package] = version(package)
        except Exception:  # not installed: leave it out
            pass
    return info


def finish(result: dict, out: str | Path) -> None:
    """Write the result, with the command that produced it, to ``out`` and print it as the script's last line (one
    line of JSON)."""
    from dqn_atari.rundir import atomic_write_text

    result = {**result, "command": shlex.join(["python", f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])}
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def warmed_runs(game: str, root: Path, device: str, capacity: int, warm: int, steps: int, k: int = 1,
                speed: tuple[str, ...] = ()) -> tuple[list, list]:
    """Seeds 1..k of the Nature config on ``game`` (replay ``capacity``; ``speed``: overrides such as compile=true),
    trained together through ``warm`` agent steps of random play and ``warm`` more with learning on, then
    checkpointed. Returns (the warmed trainers, fresh trainers that resume from there for ``steps`` more)."""
    from dqn_atari.cli import build_config
    from dqn_atari.train import Trainer, env_backend_for, train_together

    root_dir = Path(__file__).resolve().parent.parent
    cfgs = [build_config(root_dir / "configs" / "nature_dqn.yaml", [
        f"env.game={game}", f"runs_root={root}", f"device={device}", f"replay.capacity={capacity}",
        f"train.replay_start_steps={warm}", f"train.frames={4 * (2 * warm + steps)}", f"seed={seed}",
        "eval.period_steps=100000000", "train.checkpoint_period_steps=100000000",
        "train.epsilon_start=0.1", *speed])  # acting uses the network, as in the plain loop
        for seed in range(1, k + 1)]
    backend = env_backend_for(k)  # as train_runs
    warmed = [Trainer(cfg, progress=False, env_backend=backend) for cfg in cfgs]
    train_together(warmed, interrupt_at_step=2 * warm)
    return warmed, [Trainer(cfg, progress=False, env_backend=backend) for cfg in cfgs]
