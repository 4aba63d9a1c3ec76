"""Aggregate metrics over games with stratified-bootstrap confidence intervals (Agarwal et al. 2021,
"Deep RL at the Edge of the Statistical Precipice"; the definitions of its ``rliable`` library).

Scores are a list with one array per game (task) holding one score per run (seed); games may have
different numbers of runs. Internally the runs of all games sit in one flat vector sorted by game, so a
bootstrap draw is one ``(reps, n_runs)`` index matrix: the stratified bootstrap resamples runs with
replacement *within each game* (Agarwal et al. 2021, Sec. 4), keeping every game's run count.

Metrics (each a function of the flat scores and the strata):
- median / mean: of the per-game mean scores (rliable ``aggregate_median`` / ``aggregate_mean``);
- iqm: interquartile mean, the 25 %-trimmed mean of all runs of all games pooled (rliable
  ``aggregate_iqm``; with unequal run counts, games with more runs weigh more, as in any pooling);
- optimality_gap: 1 - mean over games of the per-game mean of min(score, 1) (rliable
  ``aggregate_optimality_gap`` with gamma = 1; equal to it when run counts are equal);
- above_human: number of games whose mean HNS exceeds 1, i.e. above 100 % (the count the later papers give;
  Nature 2015 counts games at "human level", 75 % or more, so its count is not this one).
rliable itself is not used: its `arch` dependency pulls in statsmodels and fails to import with pandas 3.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats


class Strata:
    """Runs of several games in one flat vector, sorted by game."""

    def __init__(self, per_game: Sequence[np.ndarray]) -> None:
        arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in per_game]
        if not arrays or any(a.size == 0 for a in arrays):
            raise ValueError("need at least one game, and at least one run for every game")
        if any(not np.all(np.isfinite(a)) for a in arrays):
            raise ValueError("scores must be finite (drop games without a human/random reference first)")
        self.values = np.concatenate(arrays)
        self.counts = np.array([a.size for a in arrays])
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.game = np.repeat(np.arange(len(arrays)), self.counts)

    @property
    def n_games(self) -> int:
        return len(self.counts)

    @property
    def n_runs(self) -> int:
        return self.values.size

    def game_means(self, x: np.ndarray) -> np.ndarray:
        """Per-game means of flat scores ``x`` (..., n_runs) -> (..., n_games)."""
        return np.add.reduceat(x, self.starts, axis=-1) / self.counts

    def resample_indices(self, reps: int, rng: np.random.Generator) -> np.ndarray:
        """(reps, n_runs) indices: each position draws, with replacement, a run of its own game."""
        u = rng.random((reps, self.n_runs))
        return self.starts[self.game] + (u * self.counts[self.game]).astype(np.int64)


Metric = Callable[[np.ndarray, Strata], np.ndarray]

METRICS: dict[str, Metric] = {
    "median": lambda x, s: np.median(s.game_means(x), axis=-1),
    "mean": lambda x, s: s.game_means(x).mean(axis=-1),
    "iqm": lambda x, s: scipy.stats.trim_mean(x, 0.25, axis=-1),
    "optimality_gap": lambda x, s: 1.0 - s.game_means(np.minimum(x, 1.0)).mean(axis=-1),
    "above_human": lambda x, s: (s.game_means(x) > 1.0).sum(axis=-1).astype(np.float64),
}


@dataclass(frozen=True)
class Estimate:
    point: float
    low: float
    high: float


def bootstrap(
    per_game: Sequence[np.ndarray] | Strata,
    statistic: Callable[[np.ndarray, Strata], np.ndarray],
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 1000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and percentile stratified-bootstrap interval of a (possibly vector-valued) statistic.

    ``statistic(x, strata)`` maps flat scores (..., n_runs) to (...,) or (..., k). Returns (point, low, high).
    Percentile intervals are rliable's default (``method='percentile'``).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if reps < 1:
        raise ValueError(f"reps must be positive, got {reps}")
    strata = per_game if isinstance(per_game, Strata) else Strata(per_game)
    rng = np.random.default_rng(seed)
    point = np.asarray(statistic(strata.values, strata))
    draws = []
    for start in range(0, reps, chunk):
        idx = strata.resample_indices(min(chunk, reps - start), rng)
        draws.append(np.asarray(statistic(strata.values[idx], strata)))
    draws = np.concatenate(draws, axis=0)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha], axis=0)
    return point, low, high


def has_interval(per_game: Sequence[np.ndarray]) -> bool:
    """Whether a stratified-bootstrap interval means what it says: every game has at least two runs. A game
    with one run is the same in every draw, so an interval would describe the other games' spread only (and
    with one run per game it has zero width)."""
    return bool(per_game) and all(np.shape(g)[0] >= 2 for g in per_game)


def aggregate(
    per_game: Sequence[np.ndarray],
    metrics: Sequence[str] = tuple(METRICS),
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Named aggregate metrics (see module docstring) with stratified-bootstrap confidence intervals."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(METRICS)}")
    chosen = [METRICS[m] for m in metrics]
    point, low, high = bootstrap(
        per_game, lambda x, s: np.stack([f(x, s) for f in chosen], axis=-1), reps, confidence, seed
    )
    return {m: Estimate(float(p), float(lo), float(hi)) for m, p, lo, hi in zip(metrics, point, low, high)}


def performance_profile(
    per_game: Sequence[np.ndarray],
    taus: np.ndarray,
    reps: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score distribution (Agarwal et al. 2021, Sec. 5.1): fraction of runs with score > tau, for each tau.

    Runs are weighted so every game counts equally (mean over games of the fraction of its runs above
    tau; rliable's ``run_score_deviation`` when run counts are equal). Returns (profile, low, high).
    """
    taus = np.asarray(taus, dtype=np.float64)
    strata = Strata(per_game)

    def profile(x: np.ndarray, s: Strata) -> np.ndarray:
        above = (x[..., None, :] > taus[:, None]).astype(np.float64)  # (..., n_taus, n_runs)
        return s.game_means(above).mean(axis=-1)

    chunk = max(1, 4_000_000 // (taus.size * strata.n_runs))  # bounds the (chunk, n_taus, n_runs) array
    return bootstrap(strata, profile, reps=reps, confidence=confidence, seed=seed, chunk=chunk)


def t_interval(x: np.ndarray, axis: int = 0, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and Student-t interval over seeds along ``axis`` (NaNs ignored; no interval for one seed)."""
    x = np.asarray(x, dtype=np.float64)
    n = np.sum(np.isfinite(x), axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN is the right answer
        mean = np.nanmean(x, axis=axis)
        sd = np.nanstd(x, axis=axis, ddof=1) if x.shape[axis] > 1 else np.full_like(mean, np.nan)
        half = scipy.stats.t.ppf(0.5 + confidence / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
    half = np.where(n > 1, half, np.nan)
    return mean, mean - half, mean + half
