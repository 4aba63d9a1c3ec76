"""A K-ary sum tree for proportional prioritized replay, vectorised over a batch.

Schaul et al. 2016 ("Prioritized Experience Replay", ICLR), Appendix B.2.1, store priorities in a binary
sum tree so that sampling and updates cost O(log N). We use the same idea with K = 32 children per node,
and each level is a handful of NumPy calls over the whole batch (no per-item Python loop), which is what
dominates the cost in NumPy; so the fewer levels the better. The tree also stops below the root: its top
level is the first with at most `top_nodes` nodes (1,024 at 1M leaves), and sampling searches that level
for the whole batch with one cumsum and one searchsorted (every draw would descend the same few top
nodes). At 1M leaves that leaves 2 levels to descend per draw and to update per write, instead of the
binary tree's 20.

Every internal node is recomputed as the sum of its children (never updated by adding deltas), so
floating-point error cannot drift however many updates are made. The sum is NumPy's row reduction, whose
rounding does not depend on how many rows one call sums (a BLAS matrix-vector product's does), so the tree is
a function of its leaves alone: one rebuilt from saved priorities equals the saved one bit for bit, and a
resumed run samples exactly as the run never stopped.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SumTree"]


def _level_sizes(size: int, branching: int, top_nodes: int) -> list[int]:
    """Node counts from the leaves (padded to a power of K) up to the first level with <= top_nodes nodes."""
    depth = 0
    while branching**depth < size:
        depth += 1
    sizes = [branching**depth]
    while sizes[-1] > max(1, top_nodes):
        sizes.append(sizes[-1] // branching)
    return sizes


class SumTree:
    """Sum tree over `size` non-negative leaf values (float64).

    `levels[0]` holds the leaves (padded with zeros to a power of K), `levels[depth]` the top level: at most
    `top_nodes` nodes, searched with one cumsum shared by a batch (`top_nodes=1` makes it the classic root).
    """

    def __init__(self, size: int, branching: int = 32, top_nodes: int = 4096) -> None:
        if size < 1:
            raise ValueError(f"SumTree size must be >= 1, got {size}")
        if branching < 2:
            raise ValueError(f"SumTree branching must be >= 2, got {branching}")
        self.size = int(size)
        self.branching = int(branching)
        self.levels = [np.zeros(n, dtype=np.float64) for n in _level_sizes(self.size, self.branching, top_nodes)]
        self.depth = len(self.levels) - 1
        self._exclusive_ones = np.triu(np.ones((branching, branching + 1)), k=1)
        # _children[lvl][j] = the K children (at level lvl) of node j at level lvl + 1 (views, no copies).
        self._children = [level.reshape(-1, branching) for level in self.levels[:-1]]

    @property
    def leaves(self) -> np.ndarray:
        """The leaf values (a view; write through `set`/`set_all` so the sums stay right)."""
        return self.levels[0][: self.size]

    @property
    def total(self) -> float:
        return float(self.levels[-1].sum())

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels)

    @staticmethod
    def bytes_needed(size: int, branching: int = 32, top_nodes: int = 4096) -> int:
        return 8 * sum(_level_sizes(size, branching, top_nodes))

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.levels[0][indices]

    def set(self, indices: np.ndarray, values: np.ndarray, unique: bool = False) -> None:
        """Set leaves `indices` to `values`. With duplicate indices the LAST write wins (as in a loop).

        `unique=True` promises there are no duplicates and skips the sort that enforces that rule.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != indices.shape:  # a scalar for all (broadcast_to costs more than the check)
            values = np.broadcast_to(values, indices.shape)
        if indices.size == 0:
            return
        if indices.min() < 0 or indices.max() >= self.size:
            raise IndexError(f"SumTree indices must lie in [0, {self.size}), got {indices.min()}..{indices.max()}")
        if not (values.min() >= 0 and math.isfinite(values.max())):  # a NaN fails the first test
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
            self.levels[lvl][node] = self._children[lvl - 1][node].sum(axis=1)  # as set_all sums: see the docstring

    def set_all(self, values: np.ndarray) -> None:
        """Replace every leaf and rebuild all sums (used after loading a save)."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.size,):
            raise ValueError(f"SumTree.set_all expects shape ({self.size},), got {values.shape}")
        self.levels[0][: self.size] = values
        for lvl in range(1, self.depth + 1):
            self.levels[lvl][:] = self._children[lvl - 1].sum(axis=1)

    def find(self, mass: np.ndarray) -> np.ndarray:
        """Leaf index i for each prefix mass m with sum(leaves[:i]) <= m < sum(leaves[:i+1]).

        Never returns a zero-valued leaf: a guard keeps m strictly inside each chosen node's mass against
        rounding, and any leaf found to be 0 anyway is searched again with exact sequential sums.
        Requires total > 0.
        """
        return self._find(np.asarray(mass, dtype=np.float64).reshape(-1), self._top_prefix())

    def _top_prefix(self) -> np.ndarray:
        """prefix[i] = sum of the top level's nodes before i (prefix[0] = 0, prefix[-1] = the total)."""
        top = self.levels[-1]
        prefix = np.empty(top.size + 1)
        prefix[0] = 0.0
        np.cumsum(top, out=prefix[1:])
        return prefix

    def _find(self, mass: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        leaves = self._search(mass, prefix, self._prefix_matmul)
        bad = self.levels[0][leaves] <= 0
        if bad.any():  # only if the BLAS prefix sums rounded non-monotonically; never seen, but be exact
            leaves[bad] = self.find_exact(mass[bad])
        return leaves

    def find_exact(self, mass: np.ndarray) -> np.ndarray:
        """`find` with sequential sums (np.cumsum) at every level: slower; the fallback of `find`."""
        return self._search(np.asarray(mass, dtype=np.float64).reshape(-1), self._top_prefix(), self._prefix_cumsum)

    def _search(self, mass: np.ndarray, prefix: np.ndarray, prefix_sums) -> np.ndarray:
        """The top level for the whole batch (`prefix` from `_top_prefix`), then the levels below per draw."""
        v = np.minimum(mass, np.nextafter(prefix[-1], 0.0))
        node = np.searchsorted(prefix, v, side="right") - 1  # prefix[node] <= v < prefix[node + 1]: a non-zero node
        return self._descend(node, v - prefix[node], prefix_sums)

    def _prefix_matmul(self, children: np.ndarray) -> np.ndarray:
        # (B, K) @ (K, K+1) strictly-upper ones: column j = sum of children before j. One BLAS call is
        # several times faster than np.cumsum along a short axis.
        return children @ self._exclusive_ones

    @staticmethod
    def _prefix_cumsum(children: np.ndarray) -> np.ndarray:
        out = np.zeros((children.shape[0], children.shape[1] + 1))
        np.cumsum(children, axis=1, out=out[:, 1:])
        return out

    def _descend(self, node: np.ndarray, v: np.ndarray, prefix_sums) -> np.ndarray:
        """Leaves under top-level nodes `node` for remaining masses `v` (>= 0, changed in place)."""
        rows = np.arange(v.size)
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
        prefix = self._top_prefix()
        total = prefix[-1]
        if not total > 0:
            raise ValueError("cannot sample from a SumTree whose total is 0")
        if stratified:
            mass = (np.arange(k) + rng.random(k)) * (total / k)
        else:
            mass = rng.random(k) * total
        return self._find(mass, prefix)
