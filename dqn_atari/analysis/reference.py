"""Published reference data vendored in ``results/reference/`` (see its SOURCES.md): random/human scores,
per-game paper scores, published aggregates and Dopamine's learning curves. Read lazily, once per root."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_REFERENCE_ROOT = Path("results/reference")

# Human-normalized score tables (HNS = (score - random) / (human - random)).
# "standard": the 57-game table used by the Dueling, Prioritized, C51 and Rainbow papers and DQN Zoo.
# "nature2015": Mnih et al. 2015, Extended Data Table 2 (49 games); differs on 34 games, so use it only to
# recompute Nature-era percentages (e.g. van Hasselt et al. 2016, Tables 1-2).
HNS_TABLES = {"standard": "atari_random_human.csv", "nature2015": "atari_random_human_nature2015.csv"}

# Dopamine baselines: one iteration = 250k agent steps = 1M frames (Castro et al. 2018; SOURCES.md).
DOPAMINE_FRAMES_PER_ITERATION = 1_000_000

_GYM_AFFIXES = re.compile(r"^ale/|(noframeskip|deterministic)?(-v\d+)?$", re.IGNORECASE)


def game_key(name: str) -> str:
    """One spelling for every game name: ``SpaceInvaders``, ``space_invaders``, ``spaceinvaders``,
    ``ALE/SpaceInvaders-v5`` and ``SpaceInvadersNoFrameskip-v4`` all become ``spaceinvaders``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a game name must be a non-empty string like 'Breakout', got {name!r}")
    return re.sub(r"[^a-z0-9]", "", _GYM_AFFIXES.sub("", name.strip()).lower())


def display_name(snake: str) -> str:
    """``space_invaders`` -> ``SpaceInvaders`` (the ALE/Gymnasium spelling used for run directories)."""
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_"))


class Reference:
    """The reference tables under one root, each read on first use."""

    def __init__(self, root: str | Path = DEFAULT_REFERENCE_ROOT) -> None:
        self.root = Path(root)
        if not (self.root / HNS_TABLES["standard"]).is_file():
            raise ValueError(
                f"no reference data at {self.root} (expected {HNS_TABLES['standard']} there); "
                "pass the folder holding the vendored CSVs, normally results/reference"
            )

    def _read(self, name: str) -> pd.DataFrame:
        path = self.root / name
        if not path.is_file():
            raise ValueError(f"reference file {path} is missing; restore it from version control")
        df = pd.read_csv(path)
        if "game" in df.columns:
            df["game_key"] = df["game"].map(game_key)
        return df

    @functools.cached_property
    def paper_scores(self) -> pd.DataFrame:
        """``game, algorithm, score, protocol, source, game_key``."""
        return self._read("paper_scores.csv")

    @functools.cached_property
    def aggregates(self) -> pd.DataFrame:
        return self._read("aggregates.csv")

    @functools.cached_property
    def dopamine_curves(self) -> pd.DataFrame:
        """Dopamine's curves with ``frames`` = frames seen by the end of each iteration."""
        df = self._read("dopamine_curves.csv")
        df["frames"] = (df["iteration"] + 1) * DOPAMINE_FRAMES_PER_ITERATION
        return df

    @functools.cache  # noqa: B019 (a Reference lives as long as the process anyway)
    def random_human(self, table: str = "standard") -> pd.DataFrame:
        """``random, human, game`` indexed by game key."""
        if table not in HNS_TABLES:
            raise ValueError(f"unknown HNS table {table!r}; choose one of {sorted(HNS_TABLES)}")
        return self._read(HNS_TABLES[table]).set_index("game_key")[["game", "random", "human"]]

    def hns(self, scores, games, table: str = "standard") -> np.ndarray:
        """Human-normalized scores; NaN for games the table lacks."""
        rh = self.random_human(table)
        keys = [game_key(g) for g in np.atleast_1d(np.asarray(games, dtype=object))]
        rand = rh["random"].reindex(keys).to_numpy(dtype=np.float64)
        human = rh["human"].reindex(keys).to_numpy(dtype=np.float64)
        return (np.asarray(scores, dtype=np.float64) - rand) / (human - rand)

    def has_hns(self, game: str, table: str = "standard") -> bool:
        """Whether ``table`` has random and human scores for ``game``."""
        return game_key(game) in self.random_human(table).index

    def display_name(self, key: str) -> str:
        """The run-directory spelling of a game key, from the standard table when it knows the game."""
        rh = self.random_human("standard")
        if key in rh.index:
            return display_name(rh.at[key, "game"])
        return key

    def paper_rows(self, algorithms, game: str | None = None) -> pd.DataFrame:
        """Rows of paper_scores.csv for ``algorithms`` (in that order), optionally for one game."""
        ps = self.paper_scores
        rows = ps[ps["algorithm"].isin(list(algorithms))]
        if game is not None:
            rows = rows[rows["game_key"] == game_key(game)]
        order = {a: i for i, a in enumerate(algorithms)}
        return rows.assign(_order=rows["algorithm"].map(order)).sort_values(["_order", "protocol", "game_key"]).drop(
            columns="_order"
        )

    def dopamine_curve(self, agent: str, game: str, dopamine_set: str = "legacy") -> pd.DataFrame:
        """One Dopamine curve (``frames, mean_return, std_return, n_seeds``); empty when there is none."""
        dc = self.dopamine_curves
        rows = dc[(dc["agent"] == agent) & (dc["dopamine_set"] == dopamine_set) & (dc["game_key"] == game_key(game))]
        return rows.sort_values("frames").reset_index(drop=True)


@functools.lru_cache(maxsize=8)
def _load_reference(root: Path) -> Reference:
    return Reference(root)


def load_reference(root: str | Path = DEFAULT_REFERENCE_ROOT) -> Reference:
    """A cached :class:`Reference` for ``root``."""
    return _load_reference(Path(root).resolve())


def warn_missing_hns(games, what: str) -> None:
    """Warn once, naming games without a human/random reference (they drop out of HNS aggregates)."""
    games = sorted(set(games))
    if games:
        warnings.warn(f"{what}: no human/random reference for {games}; left out of HNS aggregates", stacklevel=3)
