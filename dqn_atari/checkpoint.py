"""Crash-safe checkpoints: everything a resume needs, in formats that cannot run code when loaded.

Layout, inside a run directory::

    checkpoints/
      LATEST                 name of the newest complete generation (written last, atomically; for tools)
      step_000000250000/     one generation
        tensors.safetensors  networks, optimizer state, torch RNG (safetensors: data only)
        state.json           counters, schedules, NumPy/Python RNG states, environment state, config
        replay/              the replay memory: manifest.json (CRC-32 of every chunk) + .npy chunks
        MANIFEST.json        sha256 of tensors.safetensors, state.json and replay/manifest.json, written last

Crash safety. A generation is built under ``.tmp_step_*``: every file is written, flushed and fsynced, the
MANIFEST last, the directory fsynced; only then is it renamed into place, the parent fsynced, and LATEST
moved. Older generations are removed only after that, by renaming them out of the way first (``.trash_*``)
so that a kill in the middle of a deletion never leaves a half-deleted ``step_*`` behind. A kill at any
moment therefore leaves every ``step_*`` directory complete; leftovers under dot-names are ignored by
:func:`load_checkpoint` and cleared by the next save.

Incremental replay. The replay (about 7 GB at full size) is not rewritten each time: the new generation
starts as hard links to the replay files of the generation the run last saved or resumed from, and the
replay's own ``save`` replaces only the chunks that changed, under new file names (its manifest goes
through a temporary file and a rename), so files of older generations are never modified. A consequence
worth knowing: a chunk that did not change is one inode shared by both generations, so damage to that very
file on disk affects both.

Resume. :func:`load_checkpoint` tries generations newest first. Each is checked against its MANIFEST
(sha256 of the bytes actually parsed) and the replay against its CRC-32s; a generation that fails, or whose
restore raises, is reported (a :class:`CheckpointWarning`) and the next older one is used. A config
mismatch is not corruption and is raised at once.

Safe loading. Nothing here unpickles: tensors are safetensors (a JSON header plus raw bytes), everything
else is JSON, and the replay's chunks are ``.npy`` read without pickle (object dtypes are refused).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as serialize_safetensors

from dqn_atari.config import ConfigError
from dqn_atari.rundir import atomic_write_text, fsync_dir

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "MANIFEST.json"
REPLAY = "replay"
REPLAY_MANIFEST = "replay/manifest.json"
_GENERATION = re.compile(r"^step_(\d{12})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot be written; the message says what to do."""


class CheckpointWarning(UserWarning):
    """A damaged or unusable checkpoint generation was skipped and an older one used."""


# -- low-level writing: every byte of a checkpoint reaches the OS through _write_bytes ----------------------


def _write_bytes(path: Path, data: bytes) -> None:
    """Write, flush and fsync one file (the single place a checkpoint's own files are written, so fault
    tests can make it fail like a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree as hard links (free, and the source files are never modified afterwards)."""
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(root) / name, dst / rel / name)


def _discard(path: Path) -> None:
    """Remove a generation: rename it to a dot-name first (atomic), so it stops being a generation at once."""
    trash = path.with_name(f".trash_{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def step_of(gen: Path) -> int:
    """The agent step a generation directory was written at (from its name)."""
    match = _GENERATION.match(Path(gen).name)
    if match is None:
        raise ValueError(f"{gen} is not a checkpoint generation (step_<12 digits>)")
    return int(match.group(1))


def generations(ckpt_root: Path) -> list[Path]:
    """Generation directories (``step_*``; never the ``.tmp_*`` of an unfinished write), newest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if p.is_dir() and _GENERATION.match(p.name)), reverse=True)


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


# -- saving -------------------------------------------------------------------------------------------------


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    save_replay: Callable[[Path], None] | None = None,
    keep: int = 2,
    link_from: Path | None = None,
) -> Path:
    """Write one generation for agent step ``step`` and return its directory.

    ``link_from`` is the generation the run's state descends from (the one it last saved or resumed from;
    default: the newest one older than ``step``). ``save_replay(directory)`` writes the replay into a
    directory that starts as hard links to ``link_from``'s replay, so an incremental replay save writes
    only what changed. Afterwards the new generation and the ``keep - 1`` newest ones up to ``link_from``
    are kept. Generations newer than ``link_from`` belong to a timeline the run abandoned when it resumed
    from an older generation (they failed to load): they are removed, so that they never stand in for the
    good previous generation.

    On any OS error (a full disk, say) the partial generation is removed, every existing generation is
    untouched, and a CheckpointError says so.
    """
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:012d}"
    tmp = ckpt_root / f".tmp_{final.name}"
    for stale in list(ckpt_root.glob(".tmp_*")) + list(ckpt_root.glob(".trash_*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a kill during an earlier save or deletion
    for stale in ckpt_root.glob(".LATEST.tmp*"):  # a kill between writing LATEST's temp file and its rename
        stale.unlink(missing_ok=True)
    previous = [g for g in generations(ckpt_root) if step_of(g) < step]
    if link_from is None or not Path(link_from).is_dir() or step_of(link_from) > step:
        link_from = previous[0] if previous else None
    link_from = Path(link_from) if link_from is not None else None
    try:
        tmp.mkdir()
        files: dict[str, str] = {}
        if save_replay is not None:
            if link_from is not None and (link_from / REPLAY).is_dir():
                _link_tree(link_from / REPLAY, tmp / REPLAY)
            save_replay(tmp / REPLAY)
            files[REPLAY_MANIFEST] = sha256_file(tmp / REPLAY_MANIFEST)
        blobs = {
            TENSORS: serialize_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}),
            STATE: json.dumps(state).encode(),
        }
        for name, data in blobs.items():
            _write_bytes(tmp / name, data)
            files[name] = hashlib.sha256(data).hexdigest()
        manifest = {"format_version": FORMAT_VERSION, "step": int(step), "files": files}
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
        if final.exists():  # same step written before: a generation that failed to load, being replaced
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        atomic_write_text(ckpt_root / "LATEST", final.name + "\n")
    except OSError as exc:
        # NumPy reports a short write as a plain OSError without errno: look at the disk before freeing it.
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT) or _nearly_full(ckpt_root)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f" The previous checkpoint {link_from} is intact." if link_from is not None else ""
        if full:
            raise CheckpointError(
                f"Not enough disk space to write a checkpoint in {ckpt_root} ({exc}).{kept} Free some space "
                f"(each checkpoint holds the replay memory) and re-run the same command to resume from it."
            ) from exc
        raise CheckpointError(
            f"Could not write a checkpoint in {ckpt_root}: {exc}.{kept} Fix the cause (permissions, disk) and "
            f"re-run the same command to resume."
        ) from exc
    base = step_of(link_from) if link_from is not None else step
    kept_older = 0
    for gen in generations(ckpt_root):
        if gen == final:
            continue
        if step_of(gen) > min(base, step) or kept_older >= keep - 1:
            _discard(gen)
        else:
            kept_older += 1
    return final


# -- verifying and loading ---------------------------------------------------------------------------------


def _read_manifest(gen: Path) -> dict:
    path = gen / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{gen} has no {MANIFEST} (it was not finished)")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{gen} has checkpoint format {version!r}; this code reads format {FORMAT_VERSION}")
    files = manifest.get("files")
    required = [TENSORS, STATE] + ([REPLAY_MANIFEST] if (gen / REPLAY).exists() else [])
    if not isinstance(files, dict) or any(not isinstance(files.get(name), str) for name in required):
        raise CheckpointError(f"{path} does not list checksums for {', '.join(required)} (corrupt checkpoint)")
    if manifest.get("step") != step_of(gen):
        raise CheckpointError(f"{path} says step {manifest.get('step')!r}, but the directory is {gen.name}")
    return manifest


def _read_verified(gen: Path, name: str, manifest: dict) -> bytes:
    """The bytes of one file, after checking them against the manifest (the same bytes are then parsed)."""
    path = gen / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (corrupt checkpoint)") from None
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]:
        raise CheckpointError(f"{path} does not match its checksum in {MANIFEST} (corrupt checkpoint)")
    return data


def _verify_replay_chunks(replay_dir: Path) -> None:
    """Size and CRC-32 of every replay chunk against the replay's manifest, without loading a buffer."""
    from dqn_atari.replay.storage import read_manifest

    manifest = read_manifest(replay_dir)
    for name, entry in manifest.get("arrays", {}).items():
        for chunk in entry["chunks"]:
            if chunk["file"] is None:  # all-zero bytes: no file
                continue
            path = replay_dir / chunk["file"]
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise CheckpointError(f"replay chunk {path} cannot be read ({exc}) (corrupt checkpoint)") from None
            intact = array.nbytes == chunk["nbytes"] and zlib.crc32(np.ascontiguousarray(array)) == chunk["crc32"]
            if not intact:
                raise CheckpointError(f"replay chunk {path} of {name!r} fails its size or CRC-32 check "
                                      f"(corrupt checkpoint)")


def verify_generation(gen: Path, deep: bool = True) -> dict:
    """Check one generation without restoring it: its MANIFEST, the sha256 of its files, that they parse
    (safetensors, JSON) and (``deep``) every replay chunk's CRC-32. Returns the manifest; raises
    CheckpointError naming the first problem."""
    gen = Path(gen)
    manifest = _read_manifest(gen)
    data = {name: _read_verified(gen, name, manifest) for name in manifest["files"]}
    try:
        load_safetensors(data[TENSORS])
        for name in (STATE, REPLAY_MANIFEST):
            if name in data and not isinstance(json.loads(data[name]), dict):
                raise ValueError(f"{name} does not hold a JSON object")
    except (SafetensorError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{gen} does not parse: {exc} (corrupt checkpoint)") from None
    if deep and (gen / REPLAY).exists():
        try:
            _verify_replay_chunks(gen / REPLAY)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise CheckpointError(f"the replay in {gen} is damaged: {exc}") from None
    return manifest


def inspect_checkpoints(ckpt_root: Path, deep: bool = True) -> list[tuple[Path, str | None]]:
    """Every generation, newest first, with None when it verifies or the problem found."""
    out = []
    for gen in generations(ckpt_root):
        try:
            verify_generation(gen, deep=deep)
            out.append((gen, None))
        except CheckpointError as exc:
            out.append((gen, str(exc)))
    return out


# What a damaged or foreign generation can raise while being parsed and restored. A config mismatch
# (ConfigError) is not among them: it is the user's to resolve, so it propagates. Nor are errors of the machine
# rather than the files (out of memory, an I/O error, too many open files): trying an older generation then
# would throw the newer, intact one away at the next save.
_UNUSABLE = (CheckpointError, SafetensorError, ValueError, KeyError, TypeError, IndexError, FileNotFoundError,
             RuntimeError)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocators fail with RuntimeErrors: torch.OutOfMemoryError on CUDA, a plain one on CPU."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                       and "can't allocate memory" in str(exc))


def load_checkpoint(ckpt_root: Path, restore: Callable[[dict[str, torch.Tensor], dict, Path], None]) -> Path | None:
    """Restore the newest usable generation through ``restore(tensors, state, generation_dir)``.

    A generation that fails verification, or whose ``restore`` raises, is reported with a
    CheckpointWarning and the next older one is tried (``restore`` must then overwrite everything).
    Returns the generation used, or None when there is no checkpoint at all. Raises CheckpointError when
    checkpoints exist but none is usable, and ConfigError from ``restore`` at once.
    """
    ckpt_root = Path(ckpt_root)
    problems = []
    for gen in generations(ckpt_root):
        try:
            manifest = _read_manifest(gen)
            tensors = load_safetensors(_read_verified(gen, TENSORS, manifest))
            state = json.loads(_read_verified(gen, STATE, manifest))
            if not isinstance(state, dict):
                raise CheckpointError(f"{gen / STATE} does not hold a JSON object")
            if REPLAY_MANIFEST in manifest["files"]:
                _read_verified(gen, REPLAY_MANIFEST, manifest)  # pins the chunk CRCs the replay then checks
            restore(tensors, state, gen)
        except ConfigError:
            raise
        except _UNUSABLE as exc:
            if is_out_of_memory(exc):
                raise
            problems.append(f"{gen.name}: {exc}")
            continue
        if problems:
            warnings.warn(f"Resumed from the older checkpoint {gen} because the newer one(s) could not be used: "
                          f"{'; '.join(problems)}", CheckpointWarning, stacklevel=2)
        return gen
    if not problems:
        return None
    raise CheckpointError(
        f"No usable checkpoint in {ckpt_root}: {'; '.join(problems)}. If the files were damaged, delete "
        f"{ckpt_root} and move the run's train.csv and eval.csv aside (into {ckpt_root.parent / 'old'}/, say) to "
        f"start the run again from scratch; if they were copied from another run (another game, say), put this "
        f"run's own back; if they were written by another version of dqn_atari, resume with that version."
    )
