"""A K-ary sum tree for proportional prioritized replay, vectorised over a batch.

Schaul et al. 2016 ("Prioritized Experience Replay", ICLR), Appendix B.2.1, store priorities in a binary
sum tree so that sampling and updates cost O(log N). We use the same idea with K = 32 children per node:
a tree over 1,000,000 leaves is then 4 levels deep instead of 20, and each level is a handful of NumPy
calls over the whole batch (no per-item Python loop), which is what dominates the cost in NumPy.

Every internal node is recomputed as the sum of its children (never updated by adding deltas), so
floating-point error cannot drift however many updates are made.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SumTree"]


class SumTree:
    """Sum tree over `size` non-negative leaf values (float64).

    `levels[0]` holds the leaves (padded with zeros to K**depth), `levels[depth]` the root (one value).
    """

    def __init__(self, size: int, branching: int = 32) -> None:
        if size < 1:
            raise ValueError(f"SumTree size must be >= 1, got {size}")
        if branching < 2:
            raise ValueError(f"SumTree branching must be >= 2, got {branching}")
        self.size = int(size)
        self.branching = int(branching)
        depth = 1
        while branching**depth < size:
            depth += 1
        self.depth = depth
        self.levels = [np.zeros(branching ** (depth - lvl), dtype=np.float64) for lvl in range(depth + 1)]
        self._exclusive_ones = np.triu(np.ones((branching, branching + 1)), k=1)
        self._ones = np.ones(branching)
        # _children[lvl][j] = the K children (at level lvl) of node j at level lvl + 1 (views, no copies).
        self._children = [level.reshape(-1, branching) for level in self.levels[:-1]]

    @property
    def leaves(self) -> np.ndarray:
        """The leaf values (a view; write through `set`/`set_all` so the sums stay right)."""
        return self.levels[0][: self.size]

    @property
    def total(self) -> float:
        return float(self.levels[-1][0])

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels)

    @staticmethod
    def bytes_needed(size: int, branching: int = 32) -> int:
        depth = 1
        while branching**depth < size:
            depth += 1
        return 8 * sum(branching**d for d in range(depth + 1))

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.levels[0][indices]

    def set(self, indices: np.ndarray, values: np.ndarray, unique: bool = False) -> None:
        """Set leaves `indices` to `values`. With duplicate indices the LAST write wins (as in a loop).

        `unique=True` promises there are no duplicates and skips the sort that enforces that rule.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), indices.shape)
        if indices.size == 0:
            return
        if indices.min() < 0 or indices.max() >= self.size:
            raise IndexError(f"SumTree indices must lie in [0, {self.size}), got {indices.min()}..{indices.max()}")
        if not np.all(np.isfinite(values)) or values.min() < 0:
            raise ValueError("SumTree values must be finite and >= 0")
        if unique:
            node = indices
            self.levels[0][node] = values
        else:
            # NumPy does not promise an order for duplicate fancy assignments, so keep each index's last
            # value: after a stable sort, the last of each run of equal indices is the last write.
            order = np.argsort(indices, kind="stable")
            ordered = indices[order]
            last = np.empty(ordered.size, dtype=bool)
            last[-1] = True
            np.not_equal(ordered[1:], ordered[:-1], out=last[:-1])
            node = ordered[last]
            self.levels[0][node] = values[order[last]]
        for lvl in range(1, self.depth + 1):
            node = node // self.branching
            # Duplicate parents all receive the same freshly computed sum, so no dedup is needed here.
            self.levels[lvl][node] = self._children[lvl - 1][node] @ self._ones  # BLAS: faster than .sum(1)

    def set_all(self, values: np.ndarray) -> None:
        """Replace every leaf and rebuild all sums (used after loading a save)."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.size,):
            raise ValueError(f"SumTree.set_all expects shape ({self.size},), got {values.shape}")
        self.levels[0][: self.size] = values
        for lvl in range(1, self.depth + 1):
            self.levels[lvl][:] = self.levels[lvl - 1].reshape(-1, self.branching).sum(axis=1)

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Leaf index i for each prefix mass m with sum(leaves[:i]) <= m < sum(leaves[:i+1]).

        Never returns a zero-valued leaf: a guard keeps m strictly inside each chosen node's mass against
        rounding, and any leaf found to be 0 anyway is searched again with exact sequential sums.
        Requires total > 0.
        """
        mass = np.asarray(mass, dtype=np.float64).reshape(-1)
        leaves = self._descend(mass, self._prefix_matmul)
        bad = self.levels[0][leaves] <= 0
        if bad.any():  # only if the BLAS prefix sums rounded non-monotonically; never seen, but be exact
            leaves[bad] = self._descend(mass[bad], self._prefix_cumsum)
        return leaves

    def _prefix_matmul(self, children: np.ndarray) -> np.ndarray:
        # (B, K) @ (K, K+1) strictly-upper ones: column j = sum of children before j. One BLAS call is
        # several times faster than np.cumsum along a short axis.
        return children @ self._exclusive_ones

    @staticmethod
    def _prefix_cumsum(children: np.ndarray) -> np.ndarray:
        out = np.zeros((children.shape[0], children.shape[1] + 1))
        np.cumsum(children, axis=1, out=out[:, 1:])
        return out

    def _descend(self, mass: np.ndarray, prefix_sums) -> np.ndarray:
        v = mass.copy()
        rows = np.arange(v.size)
        node = np.zeros(v.size, dtype=np.int64)
        for lvl in range(self.depth - 1, -1, -1):
            prefix = prefix_sums(self._children[lvl][node])  # (B, K+1), prefix[:, 0] = 0
            np.minimum(v, np.nextafter(prefix[:, -1], 0.0), out=v)
            child = (prefix[:, 1:] > v[:, None]).argmax(axis=1)  # first child whose cumulative mass exceeds v
            v -= prefix[rows, child]  # prefix[child] <= v exactly, so the remainder stays >= 0
            node = node * self.branching + child
        return node

    def sample(self, rng: np.random.Generator, k: int, stratified: bool = True) -> np.ndarray:
        """Draw k leaves with probability leaf / total.

        Stratified as in Schaul et al. 2016, Appendix B.2.1: [0, total) is split into k equal ranges and one
        value is drawn uniformly from each; every draw still has marginal probability leaf / total.
        """
        total = self.total
        if not total > 0:
            raise ValueError("cannot sample from a SumTree whose total is 0")
        if stratified:
            mass = (np.arange(k) + rng.random(k)) * (total / k)
        else:
            mass = rng.random(k) * total
        return self.find(mass)
