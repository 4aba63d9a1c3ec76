"""Chunked, incremental, atomic save/load of the replay's arrays (no pickle: .npy chunks + a JSON manifest).

Layout of a save directory:

    manifest.json                      format version, configuration, small state, and for every array
                                       its chunks: file name, row range, byte count and CRC-32
    <array>.<chunk>.<save id>.npy      rows [chunk * chunk_rows, (chunk + 1) * chunk_rows) of one array;
                                       a chunk whose bytes are all zero (e.g. not written yet) has no file

Why this shape: a 1M-slot Atari replay is 7 GB, and rewriting all of it at every checkpoint makes
checkpointing the bottleneck. Arrays are split into fixed row chunks (64k slots by default: 462 MB of
84x84 frames); the buffer marks a chunk dirty when any of its rows changes, and an early checkpoint of a
replay still mostly empty writes only the chunks that hold data. Every save has a random id,
kept in its manifest and by the buffer; when a directory's manifest carries the id of the buffer's last
save or load (the same directory, or a hard-linked copy of it such as the checkpoint module makes for
each new generation), only dirty chunks are written and the others keep their files. Files are never
modified in place, so hard-linked copies of older saves stay intact.

Atomicity: chunk files are always written under new names (the save id is part of the name), flushed and
fsynced; then the manifest is written to a temporary file, fsynced and renamed over manifest.json (an
atomic replace on POSIX), and the directory fsynced. Only then are the files that the new manifest does
not reference deleted. A crash at any point therefore leaves either the old or the new manifest, each
with all of its files. Loading checks every chunk's size and CRC-32 and raises ReplayCorruptError on any
mismatch, so a damaged or partial save is never silently used.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dqn_atari.rundir import fsync_dir

__all__ = ["FORMAT_VERSION", "MANIFEST", "ArraySpec", "ReplayCorruptError"]
__all__ += ["load_arrays", "read_manifest", "save_arrays"]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 2 adds chunks without a file (all zeros); version 1 saves read as before
MANIFEST = "manifest.json"
_CHUNK_FILE = re.compile(r"^[a-z_]+\.\d{6}\.[0-9a-f]{16}\.npy$")


class ReplayCorruptError(ValueError):
    """A replay save is incomplete or damaged (missing file, wrong size or checksum, bad manifest)."""


@dataclass
class ArraySpec:
    """One array to save/load: a NumPy array or a torch tensor, split along axis 0 in chunks.

    `group` names the dirty-chunk bitmap that tracks this array's changes.
    """

    name: str
    array: Any
    group: str


def _to_numpy(array: Any, start: int, stop: int) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return np.ascontiguousarray(array[start:stop])
    return array[start:stop].detach().cpu().contiguous().numpy()


def _write_chunk(path: Path, data: np.ndarray) -> None:
    """Write one .npy chunk and fsync it (a separate function so fault tests can interrupt saves)."""
    with open(path, "wb") as f:
        np.lib.format.write_array(f, data, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no replay save in {directory} ({MANIFEST} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReplayCorruptError(f"{path} is not valid JSON ({err}); the save is damaged") from err
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has replay format version {version!r}; this code reads versions {READABLE_VERSIONS}. "
            f"Load it with the dqn_atari version that wrote it."
        )
    return manifest


def save_arrays(
    directory: str | os.PathLike,
    specs: list[ArraySpec],
    chunk_rows: int,
    meta: dict[str, Any],
    dirty: dict[str, np.ndarray] | None,
    previous_save_id: str | None,
) -> str:
    """Save `specs` and `meta` into `directory`; returns the new save id.

    If the directory's current manifest has save id `previous_save_id` (the buffer's state at its last
    save or load, which this directory holds or links to) and `dirty` is given, chunks not marked dirty
    keep their existing files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    old_arrays: dict[str, Any] = {}
    if dirty is not None and previous_save_id is not None and (directory / MANIFEST).exists():
        try:
            old = read_manifest(directory)
        except (ValueError, OSError):
            old = {}
        if old.get("save_id") == previous_save_id and old.get("chunk_rows") == chunk_rows:
            old_arrays = old.get("arrays", {})

    save_id = uuid.uuid4().hex[:16]
    arrays: dict[str, Any] = {}
    for spec in specs:
        rows = int(spec.array.shape[0])
        old_chunks = old_arrays.get(spec.name, {}).get("chunks", [])
        chunks = []
        for index, start in enumerate(range(0, rows, chunk_rows)):
            stop = min(start + chunk_rows, rows)
            reusable = (
                index < len(old_chunks)
                and not dirty[spec.group][index]  # type: ignore[index]
                and (old_chunks[index]["start"], old_chunks[index]["stop"]) == (start, stop)
                and (old_chunks[index]["file"] is None or (directory / old_chunks[index]["file"]).exists())
            )
            if reusable:
                chunks.append(old_chunks[index])
                continue
            data = _to_numpy(spec.array, start, stop)
            if not data.view(np.uint8).any():  # all-zero bytes (e.g. rows not written yet): nothing to store
                chunks.append({"file": None, "start": start, "stop": stop})
                continue
            name = f"{spec.name}.{index:06d}.{save_id}.npy"
            _write_chunk(directory / name, data)
            crc = zlib.crc32(data)
            chunks.append({"file": name, "start": start, "stop": stop, "nbytes": data.nbytes, "crc32": crc})
        arrays[spec.name] = {
            "shape": [int(d) for d in spec.array.shape],
            "dtype": np.dtype(str(spec.array.dtype).replace("torch.", "")).str,
            "chunks": chunks,
        }

    manifest = {
        "format_version": FORMAT_VERSION,
        "save_id": save_id,
        "chunk_rows": chunk_rows,
        "meta": meta,
        "arrays": arrays,
    }
    tmp = directory / f"{MANIFEST}.{save_id}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    fsync_dir(directory)

    # Only now that the new manifest is durable may files it does not reference go.
    referenced = {c["file"] for a in arrays.values() for c in a["chunks"] if c["file"] is not None}
    for entry in directory.iterdir():
        stale_chunk = _CHUNK_FILE.match(entry.name) and entry.name not in referenced
        stale_tmp = entry.name.startswith(f"{MANIFEST}.") and entry.name.endswith(".tmp")
        if stale_chunk or stale_tmp:
            entry.unlink(missing_ok=True)
    return save_id


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_chunk_into(path: Path, dest: np.ndarray, expected_crc: int, expected_nbytes: int) -> None:
    """Read a .npy chunk straight into `dest` (no temporary copy) and check its header, size and CRC."""
    if not path.exists():
        raise ReplayCorruptError(f"replay chunk {path} is missing; the save is incomplete")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(f)
        except ValueError as err:
            raise ReplayCorruptError(f"replay chunk {path} has a damaged header ({err})") from err
        if tuple(shape) != dest.shape or dtype != dest.dtype or fortran or dtype.hasobject:
            raise ReplayCorruptError(
                f"replay chunk {path} holds {dtype}{tuple(shape)}, expected {dest.dtype}{dest.shape}; "
                f"the save is damaged"
            )
        view = memoryview(dest.reshape(-1).view(np.uint8))
        got = 0
        while got < dest.nbytes:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        if got != expected_nbytes or f.read(1):
            raise ReplayCorruptError(f"replay chunk {path} has the wrong size (truncated or padded); save damaged")
    if zlib.crc32(view) != expected_crc:
        raise ReplayCorruptError(f"replay chunk {path} fails its CRC-32 check; the save is damaged")


def load_arrays(directory: str | os.PathLike, specs: list[ArraySpec], manifest: dict[str, Any]) -> None:
    """Fill each spec's array from the save described by `manifest` (shapes and dtypes must match)."""
    directory = Path(directory)
    for spec in specs:
        entry = manifest["arrays"].get(spec.name)
        if entry is None:
            raise ReplayCorruptError(f"the replay save in {directory} has no array {spec.name!r}")
        shape = tuple(int(d) for d in spec.array.shape)
        dtype = np.dtype(str(spec.array.dtype).replace("torch.", ""))
        if tuple(entry["shape"]) != shape or np.dtype(entry["dtype"]) != dtype:
            raise ValueError(
                f"array {spec.name!r} in {directory} is {np.dtype(entry['dtype'])}{tuple(entry['shape'])}, "
                f"this buffer's is {dtype}{shape}"
            )
        covered = 0
        for chunk in entry["chunks"]:
            start, stop = int(chunk["start"]), int(chunk["stop"])
            if start != covered or stop <= start or stop > shape[0]:
                raise ReplayCorruptError(f"the manifest in {directory} has a bad row range for {spec.name!r}")
            covered = stop
            if chunk["file"] is None:  # all-zero bytes; reading first leaves a fresh buffer's pages unallocated
                rows = spec.array[start:stop]
                if (rows.view(np.uint8) if isinstance(rows, np.ndarray) else rows.view(torch.uint8)).any():
                    rows[...] = 0
            elif isinstance(spec.array, np.ndarray):
                _read_chunk_into(directory / chunk["file"], spec.array[start:stop], chunk["crc32"], chunk["nbytes"])
            else:
                tmp = np.empty((stop - start, *shape[1:]), dtype=dtype)
                _read_chunk_into(directory / chunk["file"], tmp, chunk["crc32"], chunk["nbytes"])
                spec.array[start:stop].copy_(torch.from_numpy(tmp))
        if covered != shape[0]:
            raise ReplayCorruptError(f"the manifest in {directory} does not cover all rows of {spec.name!r}")
