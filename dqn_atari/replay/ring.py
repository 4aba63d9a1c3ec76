"""Per-env circular frame store: each frame is stored once, stacks and n-step windows are rebuilt from slots.

This is the storage and indexing layer shared by the uniform, prioritized and (later) hindsight replays.
It owns no random generator and no sampling policy; see `dqn_atari.replay` for the full description.

Slot layout. With E envs, each env owns a ring of S = capacity // E consecutive slots; flat slot id
`env * S + pos`. One `add` writes one *transition slot* per env (the newest frame of s_t, a_t, r_{t+1} and
flags) and, when the env's episode ended, one more *final-frame slot* (the newest frame of the last
observation, no transition). One extra all-zero frame after the last slot is what a stack's padding
positions point to, so a stack is a single gather.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dqn_atari.jit import compiled, kernel_works

__all__ = ["FrameRing", "ReplayMemoryError", "available_memory_bytes"]


class ReplayMemoryError(MemoryError):
    """The machine does not have the memory the replay asks for (raised before allocating)."""


def available_memory_bytes(meminfo: str = "/proc/meminfo", cgroup_root: str | None = "/sys/fs/cgroup",
                           proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process can still allocate: `MemAvailable` from /proc/meminfo, lowered to what the
    process's memory cgroup still allows (Slurm `--mem`, Docker `-m`, Kubernetes limits: /proc/meminfo
    shows the whole node there, and exceeding the cgroup's limit gets the run OOM-killed, not refused).
    None where neither can be read (non-Linux)."""
    found: list[int] = []
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if cgroup_root is not None:
        cgroup = _cgroup_available(Path(cgroup_root), Path(proc_cgroup))
        if cgroup is not None:
            found.append(cgroup)
    return min(found) if found else None


def _cgroup_available(root: Path, proc_cgroup: Path) -> int | None:
    """limit - (usage - inactive file cache) of this process's memory cgroup (v2 or v1), if it has a limit."""

    def number(path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None  # "max" (v2) means no limit

    def stat(path: Path, key: str) -> int:
        try:
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
        except (OSError, UnicodeDecodeError):
            pass
        return 0

    try:
        lines = proc_cgroup.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    best: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _id, controllers, rel = parts
        if controllers == "":  # cgroup v2 (unified)
            base, files = root, ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in controllers.split(","):  # cgroup v1
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat",
                                            "total_inactive_file")
        else:
            continue
        # Inside a container the process's cgroup is usually mounted as the root; outside, at its path.
        for directory in (base / rel.lstrip("/"), base):
            limit = number(directory / files[0])
            if limit is None or limit >= 1 << 60:  # v1 writes "no limit" as a huge number
                continue
            usage = (number(directory / files[1]) or 0) - stat(directory / files[2], files[3])
            available = max(0, limit - max(0, usage))
            best = available if best is None else min(best, available)
            break
    return best


def _check_memory(needed_host: int, needed_device: int, device: Any, bytes_per_slot: int) -> None:
    """Raise ReplayMemoryError, before any allocation, if host (or GPU) memory cannot hold the replay."""
    checks = [("host memory (MemAvailable, or what the memory cgroup allows)", needed_host, available_memory_bytes())]
    if needed_device and device is not None and str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        checks.append((f"free memory on {device}", needed_device, free))
    elif needed_device:
        checks[0] = (checks[0][0], needed_host + needed_device, checks[0][2])
    for where, needed, available in checks:
        if available is not None and needed > available:
            fit = max(0, int(available * 0.9) // bytes_per_slot)
            raise ReplayMemoryError(
                f"the replay memory needs {needed / 1e9:.2f} GB of {where} but only {available / 1e9:.2f} GB "
                f"is available ({bytes_per_slot} bytes per slot). Lower replay.capacity (about {fit:,} slots "
                f"would fit) or free memory, then start again."
            )


class FrameRing:
    """Frames and per-slot transition data for `num_envs` rings of `capacity // num_envs` slots each.

    Per slot: frame, action, reward, `terminated` (no bootstrap after this transition), `episode_end`
    (the episode ended after this transition), `is_transition` (False for final-frame slots and unwritten
    ones), `ep_step` (index of the frame within its episode: how far back a stack may look) and `valid`
    (the slot can be sampled now). Frames live in NumPy, or in a torch tensor on `device`; all indexing
    data stays in NumPy on the host, so index computations are identical for both stores.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        frame_shape: tuple[int, ...],
        frame_dtype: Any,
        stack: int,
        n_step: int,
        discount: float,
        device: Any = None,
        extra_bytes_per_slot: int = 0,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if stack < 1 or n_step < 1:
            raise ValueError(f"stack and n_step must be >= 1, got stack={stack}, n_step={n_step}")
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must lie in [0, 1], got {discount}")
        slots_per_env = capacity // num_envs
        # A ring must hold whole transitions with their stacks and n-step windows, and the n + stack + 1
        # slots that refresh_validity looks at around the cursor must not wrap onto themselves.
        min_slots = 2 * (n_step + stack + 2)
        if slots_per_env < min_slots:
            raise ValueError(
                f"capacity {capacity} gives {slots_per_env} slots per env for {num_envs} envs; need at least "
                f"{min_slots} per env for stack={stack}, n_step={n_step}. Raise replay.capacity."
            )
        self.num_envs = int(num_envs)
        self.slots_per_env = int(slots_per_env)
        self.num_slots = self.num_envs * self.slots_per_env
        self.zero_slot = self.num_slots  # index of the all-zero padding frame
        self.frame_shape = tuple(int(d) for d in frame_shape)
        self.frame_dtype = np.dtype(frame_dtype)
        self.stack = int(stack)
        self.n_step = int(n_step)
        self.discount = float(discount)
        self.device = device
        self._gamma_pows = self.discount ** np.arange(self.n_step + 1, dtype=np.float64)

        frame_bytes = int(np.prod(self.frame_shape, dtype=np.int64)) * self.frame_dtype.itemsize
        # action, reward, terminated, episode_end, is_transition, ep_step, valid; then the sample cache:
        # frame ids of both observations (int32), n-step return and discount
        meta_bytes = 4 + 4 + 1 + 1 + 1 + 4 + 1 + 2 * self.stack * 4 + 4 + 4
        per_slot = frame_bytes + meta_bytes + extra_bytes_per_slot
        frames_bytes = frame_bytes * (self.num_slots + 1)
        on_device = device is not None
        _check_memory(
            needed_host=(meta_bytes + extra_bytes_per_slot) * self.num_slots + (0 if on_device else frames_bytes),
            needed_device=frames_bytes if on_device else 0,
            device=device,
            bytes_per_slot=per_slot,
        )

        n = self.num_slots
        self.action = np.zeros(n, dtype=np.int32)
        self.reward = np.zeros(n, dtype=np.float32)
        self.terminated = np.zeros(n, dtype=bool)
        self.episode_end = np.zeros(n, dtype=bool)
        self.is_transition = np.zeros(n, dtype=bool)
        self.ep_step = np.zeros(n, dtype=np.int32)
        self.valid = np.zeros(n, dtype=bool)
        # The sample cache: what `sample` needs of a samplable slot, stored when the slot is refreshed so that a
        # batch is a few lookups instead of the window and stack arithmetic. It is fixed while the slot stays
        # samplable (its window and the episode steps its stacks depend on cannot change until the slot is
        # overwritten), holds garbage for other slots, and is rebuilt after a load rather than saved.
        # obs_slots[j] = (frame ids of obs_tm1, frame ids of obs_t); nstep_return/nstep_discount as `window`.
        self.obs_slots = np.zeros((n, 2, self.stack), dtype=np.int32 if n < 2**31 - 1 else np.int64)
        self.nstep_return = np.zeros(n, dtype=np.float32)
        self.nstep_discount = np.zeros(n, dtype=np.float32)
        if on_device:
            torch_dtype = torch.from_numpy(np.empty(0, dtype=self.frame_dtype)).dtype
            self.frames = torch.zeros((n + 1, *self.frame_shape), dtype=torch_dtype, device=device)
        else:
            self.frames = np.zeros((n + 1, *self.frame_shape), dtype=self.frame_dtype)
            # Touch every page now, so the whole store is resident before training starts rather than
            # failing hours in when the last pages are first written.
            self.frames.fill(0)

        self.cursor = np.zeros(self.num_envs, dtype=np.int64)  # next position to write, per env
        self.count = np.zeros(self.num_envs, dtype=np.int64)  # written slots, per env (<= slots_per_env)
        self.next_ep_step = np.zeros(self.num_envs, dtype=np.int64)  # ep_step of each env's next frame
        self.num_transitions = 0
        self.num_valid = 0
        self._env_base = np.arange(self.num_envs, dtype=np.int64) * self.slots_per_env
        self._refresh_offsets = np.arange(-self.n_step, self.stack + 1, dtype=np.int64)
        self._stack_offsets = np.arange(self.stack - 1, -1, -1, dtype=np.int64)  # column c looks back s-1-c
        self._stack_offsets_neg = -self._stack_offsets
        self._window_offsets = np.arange(self.n_step, dtype=np.int64)

    # ------------------------------------------------------------------ sizes
    @property
    def nbytes(self) -> int:
        if isinstance(self.frames, np.ndarray):
            frames = self.frames.nbytes
        else:
            frames = self.frames.numel() * self.frames.element_size()
        return int(frames + sum(a.nbytes for a in self._meta_arrays()))

    def _meta_arrays(self) -> tuple[np.ndarray, ...]:
        return (self.action, self.reward, self.terminated, self.episode_end, self.is_transition, self.ep_step,
                self.valid, self.obs_slots, self.nstep_return, self.nstep_discount)

    def slot_arrays(self) -> dict[str, Any]:
        """The per-slot arrays, by name (frames without the padding row); what a save must hold."""
        return {
            "frames": self.frames[: self.num_slots],
            "action": self.action,
            "reward": self.reward,
            "terminated": self.terminated,
            "episode_end": self.episode_end,
            "is_transition": self.is_transition,
            "ep_step": self.ep_step,
            "valid": self.valid,
        }

    # ------------------------------------------------------------------ writing
    def write(
        self,
        envs: np.ndarray,
        frames: np.ndarray,
        actions: np.ndarray | int,
        rewards: np.ndarray | float,
        terminated: np.ndarray | bool,
        episode_end: np.ndarray | bool,
        is_transition: bool,
    ) -> np.ndarray:
        """Write one slot at the cursor of each env in `envs` and advance those cursors; returns the slots."""
        pos = self.cursor[envs]
        slots = self._env_base[envs] + pos
        overwritten = int(np.count_nonzero(self.is_transition[slots]))
        self.num_transitions += (len(slots) if is_transition else 0) - overwritten
        if isinstance(self.frames, np.ndarray):
            self.frames[slots] = frames
        else:
            new = torch.from_numpy(np.ascontiguousarray(frames, dtype=self.frame_dtype))
            self.frames[torch.from_numpy(slots).to(self.frames.device)] = new.to(self.frames.device)
        self.action[slots] = actions
        self.reward[slots] = rewards
        self.terminated[slots] = terminated
        self.episode_end[slots] = episode_end
        self.is_transition[slots] = is_transition
        self.ep_step[slots] = np.minimum(self.next_ep_step[envs], np.iinfo(np.int32).max)
        self.next_ep_step[envs] += 1
        self.cursor[envs] = (pos + 1) % self.slots_per_env
        self.count[envs] = np.minimum(self.count[envs] + 1, self.slots_per_env)
        return slots

    def start_episodes(self, envs: np.ndarray) -> None:
        """The next frame written for each env in `envs` begins a new episode (its stack is zero-padded)."""
        self.next_ep_step[envs] = 0

    def refresh_validity(self, first_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Recompute `valid` around the slots just written (from per-env position `first_pos` on).

        Only these slots can change: the written ones, the n before them (their n-step window may now be
        known) and the stack-1 oldest after the cursor (their stack may now reach overwritten frames).
        The sample cache of all of them is refreshed too. Returns (changed slots, their new validity, all
        looked-at slots); the slots are distinct. A written slot that was samplable and is again (a one-step
        episode written over an episode's first slot) counts as changed: it holds a new transition.
        """
        pos = (first_pos[:, None] + self._refresh_offsets) % self.slots_per_env
        slots = (self._env_base[:, None] + pos).reshape(-1)
        now, window = self._valid_and_window(slots)
        self._store_sample_cache(slots, window)
        old = self.valid[slots]
        self.valid[slots] = now
        self.num_valid += int(np.count_nonzero(now)) - int(np.count_nonzero(old))
        written = (self._refresh_offsets >= 0) & (self._refresh_offsets < ((self.cursor - first_pos) % self.slots_per_env)[:, None])
        changed = (now != old) | (now & written.reshape(-1))
        return slots[changed], now[changed], slots

    def _store_sample_cache(self, slots: np.ndarray, window: tuple[np.ndarray, ...]) -> None:
        """Store the sample cache of `slots` (distinct) from their `window`; garbage for unsamplable slots."""
        _, ret, discount, boot = window
        self.nstep_return[slots] = ret
        self.nstep_discount[slots] = discount
        both = self.stack_slots(np.concatenate([slots, boot]))  # (2B, stack): obs_tm1 rows, then obs_t rows
        self.obs_slots[slots] = both.reshape(2, slots.size, self.stack).transpose(1, 0, 2)

    def rebuild_sample_cache(self, chunk: int = 1 << 16) -> None:
        """Recompute the sample cache of every slot (after a load), `chunk` slots at a time."""
        for start in range(0, self.num_slots, chunk):
            slots = np.arange(start, min(start + chunk, self.num_slots), dtype=np.int64)
            self._store_sample_cache(slots, self.window(slots))

    # ------------------------------------------------------------------ indexing
    def logical_age(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(age, written): age = position of each slot counted from its env's oldest stored slot (0 = oldest)."""
        if self.num_envs == 1:  # scalar per-env state: fewer NumPy calls on the per-step path
            n_env = int(self.count[0])
            age = (slots - int(self.cursor[0]) + n_env) % self.slots_per_env
        else:
            env = slots // self.slots_per_env
            n_env = self.count[env]
            age = (slots - self._env_base[env] - self.cursor[env] + n_env) % self.slots_per_env
        return age, age < n_env

    def compute_valid(self, slots: np.ndarray) -> np.ndarray:
        """Whether each slot is a transition whose stack and n-step window are fully stored (pure function).

        Stored means: the slot and its bootstrap slot (slot + m) are written and not overwritten, and the
        frames its stack uses (back to its episode's start, at most stack - 1 slots) are not overwritten.
        """
        return self._valid_and_window(slots)[0]

    def _valid_and_window(self, slots: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """(compute_valid(slots), window(slots)), computing the window once."""
        age, written = self.logical_age(slots)
        lookback = np.minimum(self.ep_step[slots], self.stack - 1)
        window = self.window(slots)
        newest = age + window[0]  # age of the bootstrap slot; it must be written: age + m < count
        ok = written & self.is_transition[slots] & (lookback <= age)
        if self.num_envs == 1:
            return ok & (newest < self.count[0]), window
        return ok & (newest < self.count[slots // self.slots_per_env]), window

    def offset_slots(self, slots: np.ndarray, offsets: np.ndarray | int) -> np.ndarray:
        """Slot ids `offsets` positions after `slots` within each slot's own ring (broadcasts)."""
        if self.num_envs == 1:
            return (slots + offsets) % self.slots_per_env
        pos = slots % self.slots_per_env
        return (slots - pos) + (pos + offsets) % self.slots_per_env

    def window(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """n-step window from each transition slot: (steps m, return, discount, bootstrap slot).

        The window stops after the first transition that is `terminated` or `episode_end`, else after n.
        return = sum_{k<m} gamma^k r_{t+k+1}; discount = 0 if it stopped at a terminal, else gamma^m
        (a time-limit truncation keeps the bootstrap); bootstrap slot = slot + m, which after an
        episode end is the final-frame slot. Return and discount are float32. Only meaningful for slots
        that `compute_valid` accepts.
        """
        if self.n_step == 1:  # the same rules with m = 1 always, without the (B, n) arrays
            discount = np.where(self.terminated[slots], np.float32(0.0), np.float32(self.discount))
            return np.ones(slots.shape, dtype=np.int64), self.reward[slots], discount, self.offset_slots(slots, 1)
        win = self.offset_slots(slots[:, None], self._window_offsets)
        terminal = self.terminated[win]
        stop = terminal | self.episode_end[win]
        alive = np.ones(win.shape, dtype=bool)  # alive[:, k]: step k is inside the window
        np.logical_and.accumulate(~stop[:, :-1], axis=1, out=alive[:, 1:])
        steps = alive.sum(axis=1)
        ret = (self.reward[win] * np.where(alive, self._gamma_pows[: self.n_step], 0.0)).sum(axis=1)
        discount = np.where((alive & terminal).any(axis=1), 0.0, self._gamma_pows[steps])
        return steps, ret.astype(np.float32), discount.astype(np.float32), self.offset_slots(slots, steps)

    def stack_slots(self, slots: np.ndarray) -> np.ndarray:
        """(B, stack) slot ids whose frames form the observation ending at each slot, oldest first.

        Positions before the episode's first frame point to the all-zero padding frame.
        """
        src = self.offset_slots(slots[:, None], self._stack_offsets_neg)
        return np.where(self._stack_offsets <= self.ep_step[slots][:, None], src, self.zero_slot)

    def gather(self, slot_ids: np.ndarray, channels_last: bool = False) -> Any:
        """Frames at `slot_ids` (any shape) as one array/tensor of shape (*slot_ids.shape, *frame), contiguous.

        The NumPy store copies with NumPy's single-threaded fancy indexing on purpose: torch's
        multi-threaded index_select is 2-3x faster on an idle machine, but on a busy one (envs stepping,
        other jobs) waiting for its worker threads made a batch 50x slower in our measurements.

        `channels_last`: stacks of four uint8 images (`slot_ids` of shape (..., 4), frames (H, W)) come as a
        view of a contiguous (..., H, W, 4) array instead: channels-last strides, which the CPU convolutions
        want (torch then sees a `channels_last` tensor, and `Agent._frames` has nothing left to permute). A
        compiled gather writes each pixel's four frames as one 32-bit word: ~0.04 ms for two batches of 32
        stacks, where permuting the plain gather's result costs ~0.35 ms (2-core CPU). Same values either way;
        other shapes, the torch store and machines without numba get the plain gather.
        """
        if isinstance(self.frames, np.ndarray):
            if channels_last and self._interleaves(slot_ids):
                return _gather_channels_last(self.frames, slot_ids)
            return self.frames[slot_ids]
        flat = torch.from_numpy(np.ascontiguousarray(slot_ids, dtype=np.int64).reshape(-1))
        out = self.frames.index_select(0, flat.to(self.frames.device, non_blocking=True))
        return out.view(*slot_ids.shape, *self.frame_shape)

    def _interleaves(self, slot_ids: np.ndarray) -> bool:
        return (slot_ids.ndim >= 1 and slot_ids.shape[-1] == 4 and len(self.frame_shape) == 2
                and self.frame_dtype == np.uint8 and _interleave_works())

    # ------------------------------------------------------------------ state for save/load
    def state(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor.tolist(),
            "count": self.count.tolist(),
            "next_ep_step": self.next_ep_step.tolist(),
            "num_transitions": self.num_transitions,
            "num_valid": self.num_valid,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.cursor[:] = state["cursor"]
        self.count[:] = state["count"]
        self.next_ep_step[:] = state["next_ep_step"]
        self.num_transitions = int(state["num_transitions"])
        self.num_valid = int(state["num_valid"])
        self.rebuild_sample_cache()  # the slot arrays were loaded first; the cache is derived from them

    def clear(self) -> None:
        """Forget everything (frames are left as they are; nothing can be sampled until rewritten)."""
        for arr in self._meta_arrays():
            arr.fill(0)
        self.cursor.fill(0)
        self.count.fill(0)
        self.next_ep_step.fill(0)
        self.num_transitions = 0
        self.num_valid = 0


@compiled
def _interleave4(frames: np.ndarray, stacks: np.ndarray, out: np.ndarray) -> None:
    """``out[m, y, x]`` = the four bytes ``frames[stacks[m, c], y, x]``, c = 0..3, as one little-endian 32-bit word
    (byte c is frame c): channels-last order once ``out`` is read as bytes."""
    for m in range(stacks.shape[0]):
        f0, f1, f2, f3 = frames[stacks[m, 0]], frames[stacks[m, 1]], frames[stacks[m, 2]], frames[stacks[m, 3]]
        o = out[m]
        for y in range(o.shape[0]):
            for x in range(o.shape[1]):
                o[y, x] = (np.uint32(f0[y, x]) | (np.uint32(f1[y, x]) << 8) | (np.uint32(f2[y, x]) << 16)
                           | (np.uint32(f3[y, x]) << 24))


def _gather_channels_last(frames: np.ndarray, slot_ids: np.ndarray) -> np.ndarray:
    """``frames[slot_ids]`` for uint8 (H, W) frames and ``slot_ids`` of shape (..., 4), laid out channels-last."""
    lead, (height, width) = slot_ids.shape[:-1], frames.shape[1:]
    stacks = np.ascontiguousarray(slot_ids, dtype=np.int64).reshape(-1, 4)
    if stacks.size and (stacks.min() < -len(frames) or stacks.max() >= len(frames)):  # the kernel checks no bounds
        raise IndexError(f"slot ids out of range for a store of {len(frames)} frames")
    words = np.empty((stacks.shape[0], height, width), np.uint32)
    _interleave4(frames, stacks, words)
    return np.moveaxis(words.view(np.uint8).reshape(*lead, height, width, 4), -1, -3)


@functools.cache
def _interleave_works() -> bool:
    """Whether the compiled channels-last gather runs here and gives the plain gather's values (numba installed
    and able to compile; a little-endian machine, which byte order the word packing assumes)."""
    frames = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    slot_ids = np.array([[[0, 1, 2, 3], [4, 4, 0, 2]]])
    return sys.byteorder == "little" and kernel_works(
        lambda: np.array_equal(_gather_channels_last(frames, slot_ids), frames[slot_ids]),
        "dqn_atari.replay.ring", "NumPy's gather (and a permute after it) for batches")
