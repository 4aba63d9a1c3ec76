"""One run's directory on disk: the only contract between the trainer and the analysis.

Layout (``results/runs/<variant>/<game>/seed<k>/``):

- ``config.yaml``   the fully resolved config (``variant``, ``seed``, ``env: {game, protocol, ...}``,
                    ``train: {frames, ...}``, ``eval: {epsilon, max_episode_frames, episodes, ...}``; other
                    keys are opaque here).
- ``protocol.json`` the evaluation protocol, see :data:`PROTOCOL_JSON_FIELDS`.
- ``train.csv``     one row per finished training episode, columns :data:`TRAIN_COLUMNS`. ``frames`` (there
                    and in ``eval.csv``) is agent steps x frame skip (4), the papers' unit: the no-op frames of
                    episode starts are not counted, and a step cut short by a game over counts 4.
- ``eval.csv``      one row per evaluation, columns :data:`EVAL_COLUMNS`; ``scores`` holds every
                    evaluation episode's raw score, space separated.
- ``DONE``          written last: empty, or JSON with a final summary.
- ``config_changes.yaml``  only after a resume with ``force=true`` and another config: for each, the agent step
                    it went on from and what changed (``config.yaml`` holds the newest config).

Whole files (config, protocol, DONE, truncated CSVs) are written atomically (temp file + rename), so a
crash leaves either the old or the new file, never half of one. CSVs are appended to and flushed per
call; a crash in the middle of an append can leave one partial last line, which readers ignore and the
next append or :meth:`RunDir.truncate_after` removes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

TRAIN_COLUMNS = ("agent_step", "frames", "episode", "score", "length", "epsilon", "wall_time")
EVAL_COLUMNS = (
    "agent_step", "frames", "mean_score", "median_score", "std_score", "num_episodes", "scores", "wall_time",
)
# The protocol.json fields the analysis reads; only `name` is required. Every other field is kept too and
# takes part in grouping (runs whose protocol.json differ in anything but `description` are never averaged
# together). Missing fields fall back to config.yaml (`eval.epsilon`, `eval.max_episode_frames`).
PROTOCOL_JSON_FIELDS = {
    "name": "preset name, e.g. 'nature2015' or 'machado2018'",
    "description": "citation and summary; a trailing 'Overrides: k=v, ...' is shown in table headers",
    "start": "episode start type in words: 'no-op starts', 'human starts', 'sticky actions' or 'none'",
    "noop_max": "ALE draws 0 to noop_max - 1 no-op frames at reset (Nature 2015, Ext. Data Table 1: 'no-op max' 30)",
    "repeat_action_probability": "sticky-action probability (Machado et al. 2018, Sec. 5.2: 0.25; 0 for none)",
    "eval_epsilon": "epsilon of the evaluation policy (Nature 0.05; Rainbow/Dopamine 0.001; 0 with noisy nets)",
    "eval_max_episode_frames": "evaluation episode cap in frames (Nature 18,000 = 5 min; 108,000 = 30 min)",
}

SEED_DIR = re.compile(r"^seed(\d+)$")


class RunDirError(ValueError):
    """A run directory is missing a file or holds a file that cannot be read back."""


def _read_mapping(path: Path, parse, parse_error: type[Exception], valid: str, mapping: str) -> dict[str, Any]:
    """``parse`` of ``path``'s text, which must be a mapping; a RunDirError naming the file otherwise."""
    fix = ("It is damaged: restore it from a copy (git, a backup), or, for a run still training, delete it: its "
           "next resume writes it again.")
    try:
        value = parse(path.read_text())
    except parse_error as err:
        raise RunDirError(f"{path} is not {valid}: {err}. {fix}") from err
    if not isinstance(value, dict):
        raise RunDirError(f"{path} should hold {mapping}, found {type(value).__name__}. {fix}")
    return value


class RunDir:
    """Writer and reader for one run's directory (see module docstring for the layout)."""

    CONFIG = "config.yaml"
    PROTOCOL = "protocol.json"
    TRAIN = "train.csv"
    EVAL = "eval.csv"
    DONE = "DONE"
    CONFIG_CHANGES = "config_changes.yaml"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @staticmethod
    def for_run(root: str | os.PathLike[str], variant: str, game: str, seed: int) -> RunDir:
        """The directory ``root/variant/game/seed{seed}``."""
        for what, name in (("variant", variant), ("game", game)):
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"{what} must be a plain directory name like 'nature_dqn' or 'Breakout', got {name!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return RunDir(Path(root) / variant / game / f"seed{int(seed)}")

    # ------------------------------------------------------------------ writing

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write the fully resolved config as YAML (atomic)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping (e.g. dataclasses.asdict(cfg)), got {type(config).__name__}")
        text = yaml.safe_dump(_plain(config, "config"), sort_keys=False, default_flow_style=False)
        atomic_write_text(self.path / self.CONFIG, text)

    def write_protocol(self, protocol: Mapping[str, Any]) -> None:
        """Write the evaluation protocol as JSON (atomic); keys as in :data:`PROTOCOL_JSON_FIELDS`."""
        if not isinstance(protocol, Mapping) or not protocol.get("name"):
            raise ValueError(f"protocol must be a mapping with at least a 'name'; fields read: {PROTOCOL_JSON_FIELDS}")
        atomic_write_text(self.path / self.PROTOCOL, json.dumps(_plain(protocol, "protocol"), indent=2) + "\n")

    def forget_config_changes_after(self, agent_step: int) -> None:
        """Drop the config changes recorded after ``agent_step`` (a resume from an earlier step replays them)."""
        changes = self.config_changes
        kept = [c for c in changes if c.get("agent_step", 0) <= agent_step]
        if len(kept) < len(changes):
            self._write_config_changes(kept)

    def record_config_change(self, agent_step: int, changes: Iterable[str]) -> None:
        """Note in config_changes.yaml that the run went on from ``agent_step`` with another config (force=true):
        config.yaml then holds the new config, and this file what the steps before had (atomic rewrite)."""
        self._write_config_changes([*self.config_changes, {"agent_step": int(agent_step), "changes": list(changes)}])

    def _write_config_changes(self, changes: list[dict[str, Any]]) -> None:
        path = self.path / self.CONFIG_CHANGES
        if changes:
            atomic_write_text(path, yaml.safe_dump(changes, sort_keys=False, default_flow_style=False))
        else:
            path.unlink(missing_ok=True)

    def append_train(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append finished training episodes to train.csv (header written when the file is created)."""
        rows = list(rows)
        if rows:
            _append_rows(self.path / self.TRAIN, TRAIN_COLUMNS, rows)

    def append_eval(self, row: Mapping[str, Any]) -> None:
        """Append one evaluation to eval.csv; ``scores`` is the list of every episode's raw score.

        ``mean_score``, ``median_score``, ``std_score`` (population s.d.) and ``num_episodes`` are computed
        from ``scores`` when not given (NaN when no episode finished within the evaluation's step budget).
        """
        if "scores" not in row:
            raise ValueError("an eval row needs 'scores': the list of every evaluation episode's raw score")
        scores = np.asarray(row["scores"], dtype=np.float64).reshape(-1)
        some = scores.size > 0
        filled = {
            "mean_score": float(scores.mean()) if some else math.nan,
            "median_score": float(np.median(scores)) if some else math.nan,
            "std_score": float(scores.std()) if some else math.nan,
            "num_episodes": int(scores.size),
            **row,
        }
        if int(filled["num_episodes"]) != scores.size:
            raise ValueError(f"num_episodes={filled['num_episodes']} but 'scores' holds {scores.size} scores")
        filled["scores"] = " ".join(repr(float(s)) for s in scores)
        _append_rows(self.path / self.EVAL, EVAL_COLUMNS, [filled])

    def truncate_after(self, agent_step: int) -> None:
        """Drop CSV rows with ``agent_step > agent_step`` (atomic rewrite), e.g. on resume from a checkpoint."""
        for name in (self.TRAIN, self.EVAL):
            path = self.path / name
            if not path.exists():
                continue
            header, lines = _read_lines(path)
            if header is None:
                continue
            try:
                step_col = header.index("agent_step")
                kept = [line for line in lines if float(next(csv.reader([line]))[step_col]) <= agent_step]
            except (ValueError, IndexError, csv.Error) as err:
                raise RunDirError(f"{path} is damaged ({err}), so the run cannot resume; nothing was changed. Repair "
                                  f"the line (each row starts with its agent_step) and re-run.") from None
            atomic_write_text(path, "".join(line + "\n" for line in [",".join(header), *kept]))

    def mark_done(self, summary: Mapping[str, Any] | None = None) -> None:
        """Write the DONE marker (empty, or JSON holding ``summary``); write it last."""
        text = "" if summary is None else json.dumps(_plain(summary, "summary"), indent=2) + "\n"
        atomic_write_text(self.path / self.DONE, text)

    # ------------------------------------------------------------------ reading

    @property
    def exists(self) -> bool:
        return self.path.is_dir()

    @property
    def is_done(self) -> bool:
        return (self.path / self.DONE).is_file()

    @property
    def done_summary(self) -> dict[str, Any]:
        """The JSON summary in DONE ({} when DONE is empty or absent)."""
        path = self.path / self.DONE
        text = path.read_text() if path.is_file() else ""
        return json.loads(text) if text.strip() else {}

    @property
    def config(self) -> dict[str, Any]:
        path = self.path / self.CONFIG
        if not path.is_file():
            raise RunDirError(f"{path} is missing: the run never started, or this is not a run directory")
        return _read_mapping(path, yaml.safe_load, yaml.YAMLError, "valid YAML", "a mapping")

    @property
    def config_changes(self) -> list[dict[str, Any]]:
        """config_changes.yaml: [{agent_step, changes}] for each forced resume ([] when there was none)."""
        path = self.path / self.CONFIG_CHANGES
        if not path.is_file():
            return []
        try:
            changes = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RunDirError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(changes, list):
            raise RunDirError(f"{path} should hold a list, found {type(changes).__name__}")
        return changes

    @property
    def protocol(self) -> dict[str, Any]:
        """protocol.json as a dict ({} when the trainer did not write one)."""
        path = self.path / self.PROTOCOL
        if not path.is_file():
            return {}
        return _read_mapping(path, json.loads, json.JSONDecodeError, "valid JSON", "a JSON object")

    @property
    def train(self) -> pd.DataFrame:
        """train.csv as a DataFrame (empty, with the standard columns, when there is none yet)."""
        return _read_csv(self.path / self.TRAIN, TRAIN_COLUMNS)

    @property
    def eval(self) -> pd.DataFrame:
        """eval.csv as a DataFrame; its ``scores`` column holds one float array per evaluation."""
        df = _read_csv(self.path / self.EVAL, EVAL_COLUMNS, text_columns=("scores",))
        parsed = []
        for i, (text, n) in enumerate(zip(df["scores"], df["num_episodes"])):
            try:
                scores = np.array(str(text).split(), dtype=np.float64) if isinstance(text, str) else np.zeros(0)
            except ValueError as err:
                raise RunDirError(f"{self.path / self.EVAL}: row {i + 1} has unreadable scores: {err}") from err
            if scores.size != n:
                raise RunDirError(
                    f"{self.path / self.EVAL}: row {i + 1} says {n} episodes but lists {scores.size} scores"
                )
            parsed.append(scores)
        df["scores"] = pd.Series(parsed, index=df.index, dtype=object)
        return df


def find_runs(root: str | os.PathLike[str]) -> list[RunDir]:
    """All readable run directories ``root/*/*/seed*``, sorted; finished or not (see ``RunDir.is_done``).

    Directories without a readable config or with corrupt CSVs are skipped with a warning naming them.
    """
    root = Path(root)
    runs = []
    for path in sorted(root.glob("*/*/seed*")):
        if not path.is_dir() or not SEED_DIR.match(path.name):
            continue
        run = RunDir(path)
        try:
            run.config, run.protocol, run.train, run.eval  # noqa: B018 (read to validate)
        except (RunDirError, OSError, UnicodeDecodeError) as err:
            warnings.warn(f"skipping run directory {path}: {err}", stacklevel=2)
            continue
        runs.append(run)
    return runs


# ---------------------------------------------------------------------- helpers


def _plain(value: Any, where: str) -> Any:
    """Convert to YAML/JSON-safe builtins (tuples, NumPy scalars, paths, enums); fail naming the key."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Enum):
        return _plain(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{where} = {value!r} ({type(value).__name__}) cannot be written; use builtins, lists, dicts")


def fsync_dir(directory: Path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a power loss (a no-op where
    directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` a temp file next to ``path`` (same suffix, for writers that go by it), fsync it, rename it
    over ``path``, fsync the directory: readers, and a full disk, leave the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text, newline=""))


def atomic_write_csv(path: str | Path, df: pd.DataFrame) -> None:
    replace_atomically(path, lambda tmp: df.to_csv(tmp, index=False))


def atomic_savefig(path: str | Path, fig: Any, **kwargs: Any) -> None:
    """A matplotlib figure saved as :func:`replace_atomically` says (the format follows ``path``'s suffix)."""
    replace_atomically(path, lambda tmp: fig.savefig(tmp, **kwargs))


def _format_cell(value: Any, column: str) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None:
        raise ValueError(f"column {column!r} needs a number, got {value!r}")
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def _append_rows(path: Path, base_columns: tuple[str, ...], rows: list[Mapping[str, Any]]) -> None:
    """Append ``rows`` to a CSV, creating it with a header (base columns, then any extra keys of the first row)."""
    header = _repair_and_read_header(path)
    if header is None:
        header = list(base_columns) + [k for k in rows[0] if k not in base_columns]
    for row in rows:
        missing = [c for c in header if c not in row]
        extra = [k for k in row if k not in header]
        if missing or extra:
            raise ValueError(
                f"{path.name}: row keys must match the columns {header}; "
                f"missing {missing}, unexpected {extra}"
            )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        writer.writerow(header)
    writer.writerows([[_format_cell(row[c], c) for c in header] for row in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _repair_and_read_header(path: Path) -> list[str] | None:
    """Header of an existing CSV (None when absent or empty); drops a partial last line left by a crash.

    Reads only the first line and the last byte, so appending stays cheap however long the file grows.
    """
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":  # rare: a crash mid-append; find the last complete line and cut there
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
        f.seek(0)
        first = f.readline().decode()
    return next(csv.reader([first])) if first.endswith("\n") else None


def _read_lines(path: Path) -> tuple[list[str] | None, list[str]]:
    """(header columns, complete data lines) of a CSV; a partial last line (no newline) is ignored."""
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = text.splitlines()
    if not lines:
        return None, []
    return next(csv.reader([lines[0]])), [line for line in lines[1:] if line]


def _read_csv(path: Path, columns: tuple[str, ...], text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read one of our CSVs and check its columns and numbers; raise RunDirError when it is corrupt."""
    header, lines = _read_lines(path) if path.is_file() else (None, [])
    if header is None:
        return pd.DataFrame({c: pd.Series(dtype=object if c in text_columns else float) for c in columns})
    missing = [c for c in columns if c not in header]
    if missing:
        raise RunDirError(f"{path} lacks columns {missing} (header: {header})")
    try:
        for number, fields in enumerate(csv.reader(lines), start=2):
            if len(fields) != len(header):
                raise RunDirError(f"{path} is corrupt: line {number} has {len(fields)} fields, the header "
                                  f"{len(header)}")
    except csv.Error as err:
        raise RunDirError(f"{path} is corrupt: {err}") from err
    text = "\n".join([",".join(header), *lines]) + "\n"
    try:
        df = pd.read_csv(io.StringIO(text), dtype={c: str for c in text_columns}, keep_default_na=False,
                         na_values={c: ["nan", "NaN", ""] for c in header if c not in text_columns})
        for c in header:
            if c not in text_columns:
                df[c] = pd.to_numeric(df[c], errors="raise")
    except (ValueError, pd.errors.ParserError) as err:
        raise RunDirError(f"{path} is corrupt: {err}") from err
    return df
