"""Per-run scores read from ``results/runs/``: final and best evaluation, raw and human-normalized, and
their mean / standard deviation / count over seeds per (variant, protocol, frame budget, game).

Final evaluation: the last evaluation of a finished run (of a run still training, included only on request:
its latest evaluation). Best evaluation: the highest evaluation mean
over the run, comparable to the "best agent" figures of the Nature 2015 and Rainbow per-game tables (see
the protocol column of paper_scores.csv); it is optimistic because the same episodes choose and score the
snapshot, so tables always name which is which.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from dqn_atari.analysis.protocol import Protocol, fmt_frames
from dqn_atari.analysis.reference import DOPAMINE_FRAMES_PER_ITERATION, Reference, game_key
from dqn_atari.config import flatten_keys, recorded_identity
from dqn_atari.rundir import RunDir, find_runs

DEFAULT_RUNS_ROOT = Path("results/runs")
SCORE_KINDS = {"final": "final eval", "best": "best eval (max over evals)"}


# Config keys that differ between the runs of one setting (seed, game), are the budget (a Setting field of its own)
# or only say how often a run writes checkpoints and logs, or where the replay keeps its frames (the batches are
# the same). Every other key of the run's identity (config.run_identity) is a hyperparameter: runs that differ in
# one are never averaged together.
NOT_HYPERPARAMETERS = ("variant", "seed", "env.game", "train.frames", "train.checkpoint_period_steps",
                       "train.log_period_steps", "replay.on_device")


@dataclass(frozen=True)
class Setting:
    """What must match for runs to be averaged together: variant, evaluation protocol, frame budget, and every
    hyperparameter of the recorded config (``ARGS="agent.lr=1e-4"`` makes another setting)."""

    variant: str
    protocol: Protocol
    frames_budget: int | None
    hyperparameters: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (dotted key, JSON value)
    # What tells it apart from settings that share its variant, protocol label and budget ('agent.lr=0.0001');
    # set by distinguish(), empty when nothing else reads alike.
    distinction: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        """The variant, and what sets it apart when another setting reads alike: 'nature_dqn (agent.lr=0.0001)'."""
        return f"{self.variant} ({self.distinction})" if self.distinction else self.variant

    def label(self) -> str:
        return f"{self.name} [{self.protocol.label()}; {fmt_frames(self.frames_budget)} frames]"

    def sort_key(self) -> tuple:
        """Variant name, then protocol label, then frame budget: the order of table columns and legends (then
        what sets apart settings alike in all three, so that they keep one order from run to run)."""
        return (self.variant, self.protocol.label(), self.frames_budget or 0, self.distinction, self.protocol.details,
                self.hyperparameters)


def hyperparameters(config: dict) -> tuple[tuple[str, str], ...]:
    """The recorded config's hyperparameters (see NOT_HYPERPARAMETERS), with the defaults of fields added since."""
    identity = flatten_keys(recorded_identity(config))
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in identity.items() if k not in NOT_HYPERPARAMETERS))


def distinguish(records: list[RunRecord]) -> list[RunRecord]:
    """Name, in each setting's ``distinction``, the recorded values in which settings differ that would otherwise
    read alike (same variant, protocol label and budget): the hyperparameters and unlabelled protocol.json
    fields. Their labels then tell them apart in tables and legends."""
    alike: dict[tuple, set[Setting]] = defaultdict(set)
    for r in records:
        alike[r.variant, r.setting.protocol.label(), r.setting.frames_budget].add(r.setting)
    renamed = {}
    for settings in alike.values():
        if len(settings) < 2:
            continue
        values = {s: {**{f"protocol.{k}": v for k, v in s.protocol.details}, **dict(s.hyperparameters)}
                  for s in settings}
        keys = sorted({k for v in values.values() for k in v})
        differ = [k for k in keys if len({v.get(k) for v in values.values()}) > 1]
        for s in settings:
            renamed[s] = replace(s, distinction=", ".join(f"{k}={values[s].get(k, '(none)')}" for k in differ))
    for r in records:
        r.setting = renamed.get(r.setting, r.setting)
    return records


@dataclass
class RunRecord:
    """One run, read once: a finished one unless ``done`` is False (``load_runs(unfinished=True)``)."""

    setting: Setting
    game: str  # run-directory spelling, e.g. 'SpaceInvaders'
    seed: int
    path: Path
    curve: pd.DataFrame = field(repr=False)  # eval rows: frames, mean_score
    frames_trained: float
    done: bool = True
    # training episodes: frames (end of each whole 1M-frame bin), mean_score, episodes; see training_returns
    train_curve: pd.DataFrame = field(default_factory=lambda: training_returns(pd.DataFrame(), 0.0), repr=False)

    @property
    def variant(self) -> str:
        return self.setting.variant

    @property
    def game_key(self) -> str:
        return game_key(self.game)

    @property
    def final_score(self) -> float:
        return float(self.curve["mean_score"].iloc[-1])

    @property
    def last_training_return(self) -> float:
        """Mean score of the training episodes of the run's last whole 1M frames (NaN before the first): the
        figure Dopamine's curves give at those frames."""
        return float(self.train_curve["mean_score"].iloc[-1]) if len(self.train_curve) else float("nan")

    @property
    def best_score(self) -> float:
        return float(self.curve["mean_score"].max())


def training_returns(train: pd.DataFrame, frames_trained: float,
                     bin_frames: int = DOPAMINE_FRAMES_PER_ITERATION) -> pd.DataFrame:
    """Mean score of the training episodes that ended in each whole bin of ``bin_frames`` frames.

    Dopamine's published curves are made this way (an iteration is 1M frames), so this is the like-for-like
    curve to draw next to them. Each bin is labelled by the frames at its end; a bin the run has not yet
    finished is left out.
    """
    columns = ["frames", "mean_score", "episodes"]
    if train.empty:
        return pd.DataFrame(columns=columns)
    end = np.ceil(train["frames"].to_numpy(dtype=np.float64) / bin_frames) * bin_frames
    bins = train.groupby(end)["score"].agg(["mean", "size"])
    bins = bins[bins.index <= frames_trained]
    return pd.DataFrame({"frames": bins.index.to_numpy(), "mean_score": bins["mean"].to_numpy(),
                         "episodes": bins["size"].to_numpy()}, columns=columns)


def record_from_rundir(run: RunDir) -> RunRecord:
    """A RunRecord from a run directory (config values win over path components)."""
    config, protocol, ev, train = run.config, run.protocol, run.eval, run.train
    ev = ev[np.isfinite(ev["mean_score"])]  # evaluations in which no episode finished say nothing
    if ev.empty:
        raise ValueError("eval.csv has no evaluation with a finished episode")
    env = config.get("env") or {}
    budget = (config.get("train") or {}).get("frames")
    frames_trained = max(float(ev["frames"].max()), float(train["frames"].max() if len(train) else 0.0))
    return RunRecord(
        setting=Setting(
            variant=str(config.get("variant") or run.path.parent.parent.name),
            protocol=Protocol.from_run(protocol, config),
            frames_budget=None if budget is None else int(budget),
            hyperparameters=hyperparameters(config),
        ),
        game=str(env.get("game") or run.path.parent.name),
        seed=int(config.get("seed", run.path.name[len("seed"):])),
        path=run.path,
        curve=ev[["agent_step", "frames", "mean_score"]].sort_values("frames").reset_index(drop=True),
        frames_trained=frames_trained,
        done=run.is_done,
        train_curve=training_returns(train, frames_trained),
    )


def load_runs(
    runs_root: str | Path = DEFAULT_RUNS_ROOT,
    variants: list[str] | None = None,
    games: list[str] | None = None,
    unfinished: bool = False,
) -> list[RunRecord]:
    """Finished runs under ``runs_root``; unfinished, empty or corrupt ones are skipped with a warning.
    ``unfinished``: runs still training (or stopped before their budget) are kept too, if evaluated."""
    wanted_games = None if games is None else {game_key(g) for g in games}
    records = []
    for run in find_runs(runs_root):
        if not run.is_done and not unfinished:
            warnings.warn(f"skipping run directory {run.path}: not finished (no DONE marker; running or partial)",
                          stacklevel=2)
            continue
        try:
            record = record_from_rundir(run)
        except ValueError as err:
            warnings.warn(f"skipping run directory {run.path}: {err}", stacklevel=2)
            continue
        if variants is not None and record.variant not in variants:
            continue
        if wanted_games is not None and record.game_key not in wanted_games:
            continue
        records.append(record)
    return distinguish(records)


def require_runs(
    runs_root: str | Path = DEFAULT_RUNS_ROOT,
    variants: list[str] | None = None,
    games: list[str] | None = None,
    unfinished: bool = False,
) -> list[RunRecord]:
    """``load_runs``, with a ValueError that says what to do when there is no finished run to analyse."""
    if not Path(runs_root).is_dir():
        raise ValueError(f"{runs_root} is not a directory: point --runs at the runs root (default {DEFAULT_RUNS_ROOT}), "
                         f"or train some runs first, e.g. `make reproduce`")
    records = load_runs(runs_root, variants, games, unfinished)
    what = "evaluated" if unfinished else "finished"
    if not records:
        if variants or games:
            found = load_runs(runs_root, unfinished=unfinished)
            have = (f"; it has {sorted({r.variant for r in found})} on {sorted({r.game for r in found})}"
                    if found else "")
            raise ValueError(f"no {what} runs under {runs_root} for variants={variants}, games={games}{have}")
        hint = "" if unfinished else (" (`python -m dqn_atari report --unfinished` reads runs still training, at "
                                      "their latest evaluation)")
        raise ValueError(f"no {what} runs under {runs_root}{hint}; train some first, e.g. `make reproduce`")
    return records


def run_table(records: list[RunRecord], reference: Reference) -> pd.DataFrame:
    """One row per run: setting, game, seed, final/best raw scores and HNS (standard table)."""
    rows = [
        {
            "setting": r.setting, "variant": r.variant, "protocol": r.setting.protocol.label(),
            "frames_budget": r.setting.frames_budget, "game": r.game, "game_key": r.game_key, "seed": r.seed,
            "frames_trained": r.frames_trained, "final_score": r.final_score, "best_score": r.best_score,
            "train_score": r.last_training_return,
        }
        for r in records
    ]
    df = pd.DataFrame(rows, columns=["setting", "variant", "protocol", "frames_budget", "game", "game_key", "seed",
                                     "frames_trained", "final_score", "best_score", "train_score"])
    for kind in SCORE_KINDS:
        df[f"{kind}_hns"] = reference.hns(df[f"{kind}_score"], df["game_key"]) if len(df) else []
    return df


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (over seeds, ddof=1) and count per (setting, game); the mean of the runs' last
    training returns (RunRecord.last_training_return) too."""
    value_cols = [f"{k}_{u}" for k in SCORE_KINDS for u in ("score", "hns")]
    grouped = runs.groupby(["setting", "game_key"], sort=False)
    out = grouped.agg(
        variant=("variant", "first"), game=("game", "first"), protocol=("protocol", "first"),
        frames_budget=("frames_budget", "first"), frames_trained=("frames_trained", "mean"),
        n_seeds=("seed", "nunique"),
    )
    for col in value_cols:
        out[f"{col}_mean"] = grouped[col].mean()
        out[f"{col}_std"] = grouped[col].std(ddof=1)
    out["train_score_mean"] = grouped["train_score"].mean()
    return out.reset_index()


def settings_in(runs: pd.DataFrame) -> list[Setting]:
    """Distinct settings, ordered by variant name, then protocol label, then frame budget."""
    return sorted(set(runs["setting"]), key=Setting.sort_key)


def per_game_hns(runs: pd.DataFrame, setting: Setting, kind: str) -> tuple[list[str], list[np.ndarray]]:
    """Game keys and per-game arrays of run HNS for one setting (games without a reference dropped)."""
    sub = runs[runs["setting"] == setting]
    keys, arrays = [], []
    for key, group in sub.groupby("game_key", sort=True):
        values = group[f"{kind}_hns"].to_numpy(dtype=np.float64)
        if np.all(np.isfinite(values)):
            keys.append(key)
            arrays.append(values)
    return keys, arrays
