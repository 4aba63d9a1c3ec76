"""Uniform replay over a per-env frame ring (see `dqn_atari.replay` for the layout and the rules)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dqn_atari.replay.ring import FrameRing
from dqn_atari.replay.storage import ArraySpec, ReplayCorruptError, load_arrays, read_manifest, save_arrays

__all__ = ["Batch", "ReplayBuffer"]


class Batch(NamedTuple):
    """A batch of n-step transitions; NumPy arrays, or torch tensors on the buffer's device.

    obs_tm1   (B, stack, *frame_shape) frame dtype: the observation in which action_tm1 was taken
    action_tm1 int64 (B,)
    reward_t  float32 (B,): sum_{k<m} gamma^k r_{t+k+1} over the window of m <= n steps
    discount_t float32 (B,): gamma^m, or 0 if the window ends at a terminal
    obs_t     (B, stack, *frame_shape): the observation m steps later, to bootstrap from
    indices   int64 (B,): flat slot ids (for priority updates)
    weights   float32 (B,): importance-sampling weights (ones for uniform replay)
    """

    obs_tm1: Any
    action_tm1: Any
    reward_t: Any
    discount_t: Any
    obs_t: Any
    indices: Any
    weights: Any


class ReplayBuffer:
    """Uniform experience replay storing each frame once (Nature DQN, Mnih et al. 2015).

    Capacity is split evenly into `num_envs` rings of `capacity // num_envs` slots each (any remainder is
    unused); a slot holds one frame, so an episode costs one slot per step plus one for its final frame.
    `device=None` keeps the store in NumPy; `device="cuda"` or `"cpu"` keeps the frames in a torch tensor
    there and returns torch tensors, with exactly the same samples for the same seed. `channels_last=True`
    asks for image batches in channels-last memory order (the layout of CPU convolutions; see
    `FrameRing.gather`): the same values, with other strides where that is cheap.
    """

    def __init__(
        self,
        capacity: int = 1_000_000,
        num_envs: int = 1,
        frame_shape: tuple[int, ...] = (84, 84),
        frame_dtype: Any = np.uint8,
        stack: int = 4,
        n_step: int = 1,
        discount: float = 0.99,
        seed: int = 0,
        device: Any = None,
        chunk_slots: int = 65_536,
        channels_last: bool = False,
    ) -> None:
        if chunk_slots < 1:
            raise ValueError(f"chunk_slots must be >= 1, got {chunk_slots}")
        self.capacity = int(capacity)
        self.num_envs = int(num_envs)
        self.device = device
        self.chunk_slots = int(chunk_slots)
        self.channels_last = bool(channels_last)
        self.ring = FrameRing(
            capacity, num_envs, frame_shape, frame_dtype, stack, n_step, discount, device,
            extra_bytes_per_slot=self._extra_bytes_per_slot(),
        )  # fmt: skip
        self.rng = np.random.default_rng(seed)
        num_chunks = -(-self.ring.num_slots // self.chunk_slots)
        # Everything is dirty until the first save; each group tracks the chunks its arrays changed in.
        self._dirty = {group: np.ones(num_chunks, dtype=bool) for group in self._dirty_groups()}
        self._last_save_id: str | None = None  # id of the save (or load) that this buffer's state matches
        self._all_envs = np.arange(self.num_envs, dtype=np.int64)

    # ------------------------------------------------------------------ hooks for subclasses
    def _extra_bytes_per_slot(self) -> int:
        return 0

    def _dirty_groups(self) -> tuple[str, ...]:
        return ("slots",)

    def _on_validity_change(self, slots: np.ndarray, now_valid: np.ndarray) -> None:
        """Called after each add with the slots that became valid (True) or invalid (False)."""

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        """Number of stored transitions (final-frame slots are not transitions)."""
        return self.ring.num_transitions

    def num_samplable(self) -> int:
        """Number of transitions that can be sampled now (stack and n-step window fully stored)."""
        return self.ring.num_valid

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the store."""
        return self.ring.nbytes

    def valid_indices(self) -> np.ndarray:
        """Sorted flat slot ids of every samplable transition."""
        return np.flatnonzero(self.ring.valid)

    # ------------------------------------------------------------------ adding
    def add(
        self,
        frames: Any,
        actions: Any,
        rewards: Any,
        terminated: Any,
        episode_end: Any,
        final_frames: Any = None,
    ) -> None:
        """Store one agent step of every env (arrays of length num_envs).

        frames[i]: newest frame of the observation in which env i took actions[i]; rewards[i]: the reward
        that followed; terminated[i]: no bootstrap after this transition (game over or a life loss used as
        a terminal); episode_end[i]: the episode really ended (game over or time-limit truncation), in
        which case final_frames[i] (the newest frame of the last observation) is required and the next add
        for env i starts a new episode.
        """
        ring = self.ring
        frames = self._check_frames(frames, "frames")
        actions = self._check_vector(actions, "actions")
        rewards = self._check_vector(rewards, "rewards")
        terminated = self._check_vector(terminated, "terminated").astype(bool, copy=False)
        episode_end = self._check_vector(episode_end, "episode_end").astype(bool, copy=False)
        if not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions must be integers (discrete action ids), got dtype {actions.dtype}")
        ended = np.flatnonzero(episode_end)
        if ended.size:
            if final_frames is None:
                raise ValueError(
                    f"envs {ended.tolist()} ended their episode: pass final_frames (newest frame of each env's "
                    f"last observation) so a truncated episode can bootstrap from it"
                )
            final_frames = self._check_frames(final_frames, "final_frames")

        first_pos = ring.cursor.copy()
        ring.write(self._all_envs, frames, actions, rewards, terminated, episode_end, is_transition=True)
        if ended.size:
            ring.write(ended, final_frames[ended], 0, 0.0, False, False, is_transition=False)
            ring.start_episodes(ended)
        changed, now_valid, looked = ring.refresh_validity(first_pos)
        self._dirty["slots"][looked // self.chunk_slots] = True
        if changed.size:
            self._on_validity_change(changed, now_valid)

    def _check_vector(self, x: Any, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.shape != (self.num_envs,):
            raise ValueError(f"{name} must have shape (num_envs,) = ({self.num_envs},), got {x.shape}")
        return x

    def _check_frames(self, x: Any, name: str) -> np.ndarray:
        x = np.asarray(x)
        expected = (self.num_envs, *self.ring.frame_shape)
        if x.shape != expected:
            raise ValueError(
                f"{name} must have shape (num_envs, *frame_shape) = {expected}, got {x.shape}; pass only the newest "
                f"frame of each observation (obs[:, -1]), not the whole stack"
            )
        allowed = "biu" if self.ring.frame_dtype.kind in "biu" else "biuf"  # never truncate floats into uint8
        if x.dtype.kind not in allowed:
            raise ValueError(f"{name} has dtype {x.dtype}, which does not fit the store's {self.ring.frame_dtype}")
        return x

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int) -> Batch:
        """A batch of `batch_size` transitions drawn uniformly (with replacement) from the samplable ones."""
        return self._batch(self._uniform_slots(batch_size), None)

    def _uniform_slots(self, batch_size: int) -> np.ndarray:
        """Uniform draws over written slots, rejecting the few invalid ones (final frames, incomplete windows,
        stacks cut by the cursor), which leaves a uniform distribution over the valid transitions."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.ring.num_valid == 0:
            raise ValueError(
                "no transition can be sampled yet: each needs its n-step window and stack stored; add more steps "
                "before sampling (the trainer's replay_start_steps)"
            )
        counts = self.ring.count
        cum = counts if self.num_envs == 1 else np.cumsum(counts)
        total = int(cum[-1])
        parts = []
        need = batch_size
        while need > 0:
            # Written positions of each env's ring are always the prefix [0, count).
            # rng.random is ~5x cheaper per call than rng.integers; the minimum guards the round-up to total.
            u = np.minimum((self.rng.random(max(2 * need, 8)) * total).astype(np.int64), total - 1)
            if self.num_envs == 1:
                slots = u
            else:
                env = np.searchsorted(cum, u, side="right")
                slots = env * self.ring.slots_per_env + u - (cum[env] - counts[env])
            slots = slots[self.ring.valid[slots]][:need]
            parts.append(slots)
            need -= slots.size
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def transitions(self, indices: Any, weights: Any = None) -> Batch:
        """The batch for given flat slot ids (must be samplable); what `sample` returns for those ids."""
        slots = np.array(indices, dtype=np.int64).reshape(-1)  # a copy: the batch must not alias the input
        if slots.size and (slots.min() < 0 or slots.max() >= self.ring.num_slots or not self.ring.valid[slots].all()):
            raise ValueError("transitions() got slot ids that are not samplable now (see valid_indices())")
        return self._batch(slots, None if weights is None else np.array(weights, dtype=np.float32).reshape(-1))

    def _batch(self, slots: np.ndarray, weights: np.ndarray | None) -> Batch:
        ring = self.ring
        # The ring's sample cache holds each samplable slot's frame ids, n-step return and discount.
        # One gather for obs_tm1 and obs_t.
        frames = ring.gather(ring.obs_slots[slots].transpose(1, 0, 2), channels_last=self.channels_last)
        if weights is None:
            weights = np.ones(slots.size, dtype=np.float32)
        fields = (ring.action[slots].astype(np.int64), ring.nstep_return[slots], ring.nstep_discount[slots], slots, weights)
        if self.device is not None:
            dev = ring.frames.device
            fields = tuple(torch.from_numpy(f).to(dev, non_blocking=True) for f in fields)
        action, reward, discount, indices, weights = fields
        return Batch(frames[0], action, reward, discount, frames[1], indices, weights)

    # ------------------------------------------------------------------ save / load
    def _config(self) -> dict[str, Any]:
        r = self.ring
        return {
            "kind": type(self).__name__,
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "frame_shape": list(r.frame_shape),
            "frame_dtype": r.frame_dtype.str,
            "stack": r.stack,
            "n_step": r.n_step,
            "discount": r.discount,
        }

    def _specs(self) -> list[ArraySpec]:
        return [ArraySpec(name, array, "slots") for name, array in self.ring.slot_arrays().items()]

    def _state(self) -> dict[str, Any]:
        return {"ring": self.ring.state(), "rng": self.rng.bit_generator.state}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.ring.set_state(state["ring"])
        self.rng.bit_generator.state = state["rng"]

    def _reset(self) -> None:
        """Back to empty (after a failed load, so a half-loaded store can never be sampled)."""
        self.ring.clear()
        for bitmap in self._dirty.values():
            bitmap.fill(True)
        self._last_save_id = None

    def save(self, directory: str | os.PathLike) -> None:
        """Save everything a resume needs (frames, slot data, cursors, episode state, RNG) to `directory`.

        Atomic, and incremental: if `directory` holds this buffer's last save or load (the same directory,
        or a hard-linked copy of it as the checkpoint module makes for each generation), only the chunks
        changed since are written; the others keep their files (see `dqn_atari.replay.storage`).
        """
        directory = Path(directory).resolve()
        meta = {"config": self._config(), "state": self._state()}
        save_id = save_arrays(directory, self._specs(), self.chunk_slots, meta, self._dirty, self._last_save_id)
        for bitmap in self._dirty.values():
            bitmap.fill(False)
        self._last_save_id = save_id

    def load(self, directory: str | os.PathLike) -> None:
        """Load a save into this buffer, which must have the same configuration (else ValueError naming the
        field). A damaged save raises ReplayCorruptError and leaves this buffer empty."""
        directory = Path(directory).resolve()
        manifest = read_manifest(directory)
        saved = manifest.get("meta", {}).get("config", {})
        for key, value in self._config().items():
            if saved.get(key) != value:
                raise ValueError(
                    f"replay save in {directory} has {key}={saved.get(key)!r} but this buffer has {key}={value!r}; "
                    f"construct the buffer with the saved configuration to load it"
                )
        try:
            load_arrays(directory, self._specs(), manifest)
            self._set_state(manifest["meta"]["state"])
            ring = self.ring
            counts = np.count_nonzero(ring.valid), np.count_nonzero(ring.is_transition)
            if counts != (ring.num_valid, ring.num_transitions):
                raise ReplayCorruptError(f"replay save in {directory} is inconsistent (flags disagree with counters)")
        except BaseException:
            self._reset()
            raise
        same_chunks = manifest["chunk_rows"] == self.chunk_slots
        for bitmap in self._dirty.values():
            bitmap.fill(not same_chunks)
        self._last_save_id = manifest["save_id"]
