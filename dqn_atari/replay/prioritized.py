"""Proportional prioritized replay (Schaul et al. 2016, "Prioritized Experience Replay", ICLR).

P(i) = p_i / sum_k p_k with p_i = (|delta_i| + eps)^alpha (Section 3.3, proportional variant); a new
transition enters with the largest priority seen so far (Algorithm 1, line 6; the first max is 1, line 2)
so that every transition is replayed at least once. Importance-sampling weights
w_i = (N * P(i))^-beta are normalised by the largest weight IN THE BATCH, as in Algorithm 1, line 10
(w_j / max_i w_i over the sampled j); N is the number of samplable transitions. Beta is the caller's: the
trainer anneals it from replay.beta0 to 1 over the whole run (Section 3.4) and passes it to `sample`.

Slots that cannot be sampled (final frames, incomplete n-step windows, stacks reaching overwritten frames)
have priority 0 in the tree, so they are never drawn; a slot receives the max priority when it becomes
samplable (for n-step, once its window is known).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dqn_atari.replay.storage import ArraySpec
from dqn_atari.replay.sum_tree import SumTree
from dqn_atari.replay.uniform import Batch, ReplayBuffer

__all__ = ["PrioritizedReplayBuffer"]


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


class PrioritizedReplayBuffer(ReplayBuffer):
    """ReplayBuffer with proportional prioritized sampling; same `add`, `sample(batch_size, beta)`.

    The default alpha=0.5 is Rainbow's (Hessel et al. 2018, Table 1: omega=0.5); Schaul et al. 2016 used 0.6
    for their proportional variant (Section 4). The configs set it (ReplayConfig.alpha).
    """

    def __init__(
        self,
        *args: Any,
        alpha: float = 0.5,
        eps: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        if alpha < 0 or eps <= 0:
            raise ValueError(f"need alpha >= 0 and eps > 0, got alpha={alpha}, eps={eps}")
        self.alpha = float(alpha)
        self.eps = float(eps)
        super().__init__(*args, **kwargs)
        self.tree = SumTree(self.ring.num_slots)
        self.max_priority = 1.0  # Schaul et al. 2016, Algorithm 1, line 2: p_1 = 1

    def _extra_bytes_per_slot(self) -> int:
        return -(-SumTree.bytes_needed(self.capacity) // self.capacity)  # float64 leaves (padded) + sums

    def _dirty_groups(self) -> tuple[str, ...]:
        return ("slots", "priority")

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.tree.nbytes

    def _on_validity_change(self, slots: np.ndarray, now_valid: np.ndarray) -> None:
        self.tree.set(slots, np.where(now_valid, self.max_priority, 0.0), unique=True)  # refresh slots are distinct
        self._dirty["priority"][slots // self.chunk_slots] = True

    def priorities(self, indices: Any) -> np.ndarray:
        """Current priorities p^alpha of flat slot ids (0 for slots that cannot be sampled)."""
        return self.tree.get(_to_numpy(indices, np.int64))

    def sample(self, batch_size: int, beta: float) -> Batch:  # type: ignore[override]
        """Draw `batch_size` transitions with P(i) = p_i / sum p, with importance weights for `beta`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        if self.ring.num_valid == 0:
            raise ValueError("no transition can be sampled yet: add more steps before sampling")
        slots = self.tree.sample(self.rng, batch_size)
        # w_j = (N P(j))^-beta / max_i (N P(i))^-beta (Algorithm 1, line 10: normalised by the batch's largest
        # weight) = (min_i p_i / p_j)^beta: N and the total cancel, and the largest weight is the smallest p.
        priority = self.tree.get(slots)
        weights = (priority.min() / priority) ** beta
        return self._batch(slots, weights.astype(np.float32))

    def update_priorities(self, indices: Any, td_abs: Any) -> None:
        """Set p_i = (|delta_i| + eps)^alpha for the sampled slots; with duplicate ids the last one wins.

        Slots that stopped being samplable since they were drawn keep priority 0.
        """
        slots = _to_numpy(indices, np.int64)
        td = np.abs(_to_numpy(td_abs, np.float64))
        if slots.shape != td.shape:
            raise ValueError(f"indices and td_abs must have the same length, got {slots.shape} and {td.shape}")
        if td.size and not math.isfinite(td.max()):  # NaN or inf anywhere makes the max NaN or inf
            raise ValueError("td_abs contains NaN or inf; the loss has diverged (check the learning rate and targets)")
        if slots.size and (slots.min() < 0 or slots.max() >= self.ring.num_slots):
            raise ValueError(f"indices must be flat slot ids in [0, {self.ring.num_slots})")
        keep = self.ring.valid[slots]
        if not keep.all():
            slots, td = slots[keep], td[keep]
        priority = (td + self.eps) ** self.alpha
        if slots.size:
            self.tree.set(slots, priority)
            self.max_priority = max(self.max_priority, float(priority.max()))
            self._dirty["priority"][slots // self.chunk_slots] = True

    # ------------------------------------------------------------------ save / load
    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "alpha": self.alpha, "eps": self.eps}

    def _specs(self) -> list[ArraySpec]:
        return [*super()._specs(), ArraySpec("priority", self.tree.leaves, "priority")]

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "max_priority": self.max_priority}

    def _set_state(self, state: dict[str, Any]) -> None:
        super()._set_state(state)
        self.max_priority = float(state["max_priority"])
        self.tree.set_all(self.tree.leaves.copy())  # the leaves were loaded in place; rebuild the sums

    def _reset(self) -> None:
        super()._reset()
        self.tree.set_all(np.zeros(self.ring.num_slots))
        self.max_priority = 1.0

