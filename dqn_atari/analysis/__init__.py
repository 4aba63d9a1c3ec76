"""Analysis of finished runs: human-normalized scores, paper-style tables, aggregate scores with
bootstrap confidence intervals, and comparison plots. Reads only ``results/runs/`` and
``results/reference/`` (both roots configurable); never imports the trainer."""

from __future__ import annotations

from dqn_atari.analysis.plots import write_plots
from dqn_atari.analysis.reference import Reference, game_key, load_reference
from dqn_atari.analysis.report import write_game_report
from dqn_atari.analysis.scores import load_runs, run_table, summarize
from dqn_atari.analysis.stats import aggregate, performance_profile
from dqn_atari.analysis.tables import write_tables
from dqn_atari.analysis.variants import VARIANTS, variant_ref

__all__ = [
    "Reference", "VARIANTS", "aggregate", "game_key", "load_reference", "load_runs", "performance_profile",
    "run_table", "summarize", "variant_ref", "write_game_report", "write_plots", "write_tables",
]
