"""Command-line entry points wired into ``python -m dqn_atari tables|plots|report``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from dqn_atari.analysis.plots import DEFAULT_FIGURES_DIR, write_plots
from dqn_atari.analysis.reference import DEFAULT_REFERENCE_ROOT
from dqn_atari.analysis.report import DEFAULT_REPORTS_DIR, write_game_report
from dqn_atari.analysis.scores import DEFAULT_RUNS_ROOT, require_runs
from dqn_atari.analysis.tables import DEFAULT_TABLES_DIR, write_tables


def _parser(prog: str, description: str, out_default: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS_ROOT, help="root of run directories (%(default)s)")
    p.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE_ROOT,
                   help="folder of vendored reference CSVs (%(default)s)")
    p.add_argument("--out", type=Path, default=out_default, help="output folder (%(default)s)")
    p.add_argument("--variant", action="append", help="only this variant (repeatable; default: all)")
    p.add_argument("--game", action="append", help="only this game (repeatable; default: all)")
    return p


def _run(fn, *args, **kwargs) -> int:
    """Call ``fn``; print written paths; print a clear error (exit code 2) on bad input."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            paths = fn(*args, **kwargs)
        except ValueError as err:
            paths, error = [], err
        else:
            error = None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def tables_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("python -m dqn_atari tables", "Write per-game and aggregate tables (Markdown, LaTeX, CSV).",
                DEFAULT_TABLES_DIR)
    p.add_argument("--reps", type=int, default=10_000, help="bootstrap resamples for CIs (%(default)s)")
    a = p.parse_args(argv)
    return _run(write_tables, a.runs, a.reference, a.out, a.variant, a.game, reps=a.reps)


def plots_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("python -m dqn_atari plots", "Draw learning curves, aggregate HNS, ablation and profile figures.",
                DEFAULT_FIGURES_DIR)
    p.add_argument("--reps", type=int, default=1000, help="bootstrap resamples for bands (%(default)s)")
    a = p.parse_args(argv)
    return _run(write_plots, a.runs, a.reference, a.out, a.variant, a.game, reps=a.reps)


def report_main(argv: Sequence[str] | None = None) -> int:
    p = _parser("python -m dqn_atari report",
                "Per-game reports (<out>/<variant>/<game>.md and .png); all finished (variant, game) pairs "
                "unless --variant/--game narrow them.", DEFAULT_REPORTS_DIR)
    p.add_argument("--unfinished", action="store_true",
                   help="also report runs still training, each at its latest evaluation (the report says so)")
    a = p.parse_args(argv)

    def reports() -> list[Path]:
        pairs = sorted({(r.variant, r.game) for r in require_runs(a.runs, a.variant, a.game, a.unfinished)})
        return [path for v, g in pairs
                for path in write_game_report(v, g, a.runs, a.reference, a.out, unfinished=a.unfinished)]

    return _run(reports)
