"""What every benchmark script shares: the machine it ran on, and the closing JSON line plus its file."""

from __future__ import annotations

import json
import os
import platform
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
    """Write the result to ``out`` and print it as the script's last line (one line of JSON)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
