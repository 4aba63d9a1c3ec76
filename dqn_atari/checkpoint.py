"""Crash-safe checkpoints: everything a resume needs, in formats that cannot run code when loaded.

Layout, inside a run directory::

    checkpoints/
      LATEST                 name of the newest complete generation (written last, atomically)
      step_000000250000/     one generation
        tensors.safetensors  networks, optimizer state, torch RNG (safetensors: data only)
        state.json           counters, schedules, NumPy/Python RNG states, environment state, config
        replay/              the replay memory (its own manifest and checksums)
        MANIFEST.json        sha256 of every file above except replay/, written after them

A generation is built under a temporary name, fsynced, then renamed into place, and only then does LATEST
move to it; the previous generation is deleted only after that. The replay (about 7 GB at full size) is not
rewritten each time: the new generation starts as hard links to the previous generation's replay files,
and the replay's own ``save`` replaces only the chunks that changed (new files under new names, so the
previous generation's files are never modified). A kill at any moment therefore leaves the previous
generation complete. On load, a generation whose manifest or checksums do not match is reported and the
next older one is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot be written; the message says what to do."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename over ``path``: readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree as hard links (free, and the source files are never modified afterwards)."""
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(root) / name, dst / rel / name)


def generations(ckpt_root: Path) -> list[Path]:
    """Complete-looking generations, newest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    save_replay: Callable[[Path], None] | None = None,
    keep: int = 2,
) -> Path:
    """Write one generation. On any OS error (a full disk, say) the partial generation is removed, the
    previous one is untouched, and a CheckpointError says so."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:012d}"
    tmp = ckpt_root / f".tmp_{final.name}"
    for stale in ckpt_root.glob(".tmp_*"):
        shutil.rmtree(stale, ignore_errors=True)
    previous = generations(ckpt_root)
    try:
        tmp.mkdir()
        if save_replay is not None:
            if previous and (previous[0] / "replay").is_dir() and previous[0] != final:
                _link_tree(previous[0] / "replay", tmp / "replay")
            save_replay(tmp / "replay")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state))
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": {}}
        for name in ("tensors.safetensors", "state.json"):
            _fsync_file(tmp / name)
            manifest["files"][name] = sha256_file(tmp / name)
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
        _fsync_file(tmp / "MANIFEST.json")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        atomic_write_text(ckpt_root / "LATEST", final.name + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f" The previous checkpoint {previous[0]} is intact." if previous else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"Not enough disk space to write a checkpoint in {ckpt_root} ({exc}).{kept} "
                f"Free some space (each checkpoint holds the replay memory) and re-run the same command to resume."
            ) from exc
        raise CheckpointError(f"Could not write a checkpoint in {ckpt_root}: {exc}.{kept}") from exc
    for old in generations(ckpt_root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _verify(gen: Path) -> dict:
    manifest_path = gen / "MANIFEST.json"
    if not manifest_path.exists():
        raise CheckpointError(f"{gen} has no MANIFEST.json (it was not finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is corrupt: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{gen} has checkpoint format {manifest.get('format_version')!r}; this code reads "
                              f"format {FORMAT_VERSION}")
    for name, digest in manifest.get("files", {}).items():
        path = gen / name
        if not path.exists() or sha256_file(path) != digest:
            raise CheckpointError(f"{path} is missing or does not match its checksum (corrupt checkpoint)")
    return manifest


def load_checkpoint(ckpt_root: Path, restore: Callable[[dict[str, torch.Tensor], dict, Path], None]) -> Path | None:
    """Restore the newest usable generation through ``restore(tensors, state, generation_dir)``.

    A generation that fails verification, or whose ``restore`` raises, is reported with a warning and the
    next older one is tried. Returns the generation used, or None when there is no checkpoint at all.
    Raises CheckpointError when checkpoints exist but none is usable.
    """
    ckpt_root = Path(ckpt_root)
    candidates = generations(ckpt_root)
    latest_file = ckpt_root / "LATEST"
    if latest_file.exists():
        named = ckpt_root / latest_file.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    if not candidates:
        return None
    problems = []
    for gen in candidates:
        try:
            _verify(gen)
            tensors = load_file(str(gen / "tensors.safetensors"))
            state = json.loads((gen / "state.json").read_text())
            restore(tensors, state, gen)
            if problems:
                warnings.warn(f"Resumed from the older checkpoint {gen} because: {'; '.join(problems)}", stacklevel=2)
            return gen
        except (CheckpointError, ValueError, KeyError, OSError, RuntimeError) as exc:
            problems.append(f"{gen.name}: {exc}")
    raise CheckpointError(
        f"No usable checkpoint in {ckpt_root}: {'; '.join(problems)}. Delete {ckpt_root} to start the run "
        f"again from scratch (the run's CSV logs are kept and will be rewritten)."
    )
