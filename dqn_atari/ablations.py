"""Rainbow and its six ablations on one game (Hessel et al. 2018, Sec. 5 "Ablation studies", Fig. 3).

``python -m dqn_atari.ablations --game Breakout [--frames 10M] [--seeds "1 2 3"] [--smoke] [key=value ...]``
(``make ablations GAME=Breakout FRAMES=... SEEDS=...``) trains ``configs/rainbow.yaml`` and each
``configs/ablations/rainbow_no_*.yaml`` for every seed, one run after another, through the same
``build_config`` + ``train`` path as ``reproduce`` (so a finished run is skipped and an interrupted one resumes
from its checkpoint: re-running the command is the recovery), then draws the ablation figure in Rainbow's
layout, raw evaluation score over frames, and writes a table beside it:

    <runs_root>/../reports/ablations/<Game>.png   (results/reports/ablations/ for real runs,
    <runs_root>/../reports/ablations/<Game>.md     results/smoke/reports/ablations/ with --smoke)

Nature DQN runs of the same game under the same runs root, if any, are drawn grey as in Fig. 3 (train them with
``make reproduce VARIANT=nature_dqn``); they are not trained here.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from dqn_atari.analysis.plots import _rainbow_line, legend_below, new_figure, palette, seed_matrix
from dqn_atari.analysis.reference import DEFAULT_REFERENCE_ROOT, load_reference
from dqn_atari.analysis.scores import RunRecord, load_runs, run_table
from dqn_atari.analysis.tables import fmt_value
from dqn_atari.analysis.variants import ABLATION_BASE, ABLATION_BASELINE, variant_ref
from dqn_atari.checkpoint import CheckpointError
from dqn_atari.config import ConfigError, find_variant_config, parse_frames
from dqn_atari.rundir import atomic_savefig, atomic_write_text

# Fig. 3's legend order; each is configs/ablations/<name>.yaml, i.e. Rainbow with one switch off.
ABLATIONS = (
    "rainbow_no_double",
    "rainbow_no_prioritized",
    "rainbow_no_dueling",
    "rainbow_no_multistep",
    "rainbow_no_distributional",
    "rainbow_no_noisy",
)
VARIANTS = (ABLATION_BASE, *ABLATIONS)


def run_ablations(game: str, seeds: Sequence[int], frames: int | None = None, smoke: bool = False,
                  overrides: Sequence[str] = (), progress: bool = True) -> tuple[Path, Path] | None:
    """Train Rainbow and every ablation on ``game`` for each seed, then write the figure and the table.

    Returns (md, png), or None when a run was stopped by a signal before finishing (re-run to resume).
    """
    from dqn_atari.cli import build_config, refuse_axis_overrides
    from dqn_atari.train import game_of, train

    refuse_axis_overrides(list(overrides), "--seeds (make: SEEDS=...)", "--game (make: GAME=...)")
    extra: dict = {"env": {"game": game}}
    if frames:
        extra["train"] = {"frames": int(frames)}
    configs = {v: find_variant_config(v) for v in VARIANTS}  # every file exists before anything trains
    cfg = None
    for variant, path in configs.items():
        for seed in seeds:
            cfg = build_config(path, [*overrides, f"seed={seed}"], smoke=smoke, extra=extra)
            if cfg.variant != variant:
                raise ConfigError(f"{path} sets variant: {cfg.variant}, expected {variant}; the run directory and the "
                                  f"figure use that name, so fix the file (or drop variant= from the overrides).")
            if not train(cfg, progress=progress).is_done:
                print(f"{variant} seed {seed} stopped before its budget; re-run the same command to resume.")
                return None
    runs_root = Path(cfg.runs_root)
    return write_ablation_report(game_of(cfg), runs_root, seeds=seeds, out_dir=runs_root.parent / "reports" / "ablations")


def _records(game: str, runs_root: Path, seeds: Sequence[int] | None) -> dict[str, list[RunRecord]]:
    """Finished runs per variant (Rainbow, the ablations, then Nature DQN if present), in Fig. 3's order.

    Raises ValueError when one variant's runs differ in protocol, frame budget or hyperparameters: their mean
    would mix them."""
    records = load_runs(runs_root, variants=[*VARIANTS, ABLATION_BASELINE], games=[game])
    groups: dict[str, list[RunRecord]] = {}
    for variant in (*VARIANTS, ABLATION_BASELINE):
        group = [r for r in records if r.variant == variant and (seeds is None or variant == ABLATION_BASELINE
                                                               or r.seed in seeds)]
        if len({r.setting for r in group}) > 1:
            runs = "; ".join(f"seed {r.seed}: {r.setting.label()}" for r in sorted(group, key=lambda r: r.seed))
            raise ValueError(f"the {variant} runs of {game} under {runs_root} differ in protocol, frame budget or "
                             f"hyperparameters ({runs}), so they cannot be averaged into one line; keep one "
                             f"setting's runs there (move the others to another runs root)")
        if group:
            groups[variant] = sorted(group, key=lambda r: r.seed)
    return groups


def _label(variant: str) -> str:
    if variant == ABLATION_BASE:
        return "Rainbow"
    if variant == ABLATION_BASELINE:
        return "DQN"
    return variant_ref(variant).ablation or variant


def plot_game_ablations(groups: dict[str, list[RunRecord]], game: str, path: Path) -> Path:
    """Hessel et al. 2018, Fig. 3 layout for one game: Rainbow rainbow-coloured, each ablation dashed, DQN grey;
    the mean evaluation score over seeds against frames."""
    fig, (ax,) = new_figure(size=(7.0, 4.5))
    colors = iter(palette(len(ABLATIONS)))
    for variant, group in groups.items():
        grid, matrix = seed_matrix(group)
        x, mean = grid / 1e6, np.nanmean(matrix, axis=0)
        label = f"{_label(variant)} (n={len(group)})"
        if variant == ABLATION_BASE:
            _rainbow_line(ax, x, mean, label)
        elif variant == ABLATION_BASELINE:
            ax.plot(x, mean, color="0.55", lw=2, label=label)
        else:
            ax.plot(x, mean, ls="--", lw=1.6, color=next(colors), marker="." if x.size < 5 else None, label=label)
    ax.set(xlabel="frames (millions)", ylabel="evaluation score (mean over seeds)",
           title=f"{game}: Rainbow ablations (Hessel et al. 2018, Fig. 3 layout)")
    legend_below(fig, ax)
    atomic_savefig(path, fig, dpi=120)
    return path


def _mean_sd(values: np.ndarray) -> str:
    if values.size == 0 or not np.all(np.isfinite(values)):
        return "-"
    return fmt_value(values.mean()) + (f" +- {fmt_value(values.std(ddof=1))}" if values.size > 1 else "")


def write_ablation_report(game: str, runs_root: str | Path, seeds: Sequence[int] | None = None,
                          out_dir: str | Path = "results/reports/ablations",
                          reference_root: str | Path = DEFAULT_REFERENCE_ROOT) -> tuple[Path, Path]:
    """Write ``out_dir/<game>.png`` (the figure) and ``out_dir/<game>.md`` (the table); returns (md, png).

    Raises ValueError when there is no finished Rainbow or ablation run of ``game`` under ``runs_root``.
    """
    runs_root = Path(runs_root)
    groups = _records(game, runs_root, seeds)
    if not any(v in groups for v in VARIANTS):
        raise ValueError(f"no finished Rainbow or ablation run of {game} under {runs_root}; "
                         f"train them first: make ablations GAME={game}")
    display = next(iter(groups.values()))[0].game
    out_dir = Path(out_dir)
    png = plot_game_ablations(groups, display, out_dir / f"{display}.png")

    reference = load_reference(reference_root)
    table = run_table([r for g in groups.values() for r in g], reference)
    has_hns = reference.has_hns(display)
    rainbow_final = (table.loc[table["variant"] == ABLATION_BASE, "final_score"].mean()
                     if ABLATION_BASE in groups else math.nan)
    header = ["variant", "switched off (Fig. 3)", "seeds", "frames trained", "final eval", "best eval"]
    header += ["final HNS %"] if has_hns else []
    header += ["final - Rainbow"]
    lines = [f"# {display}: Rainbow ablations", "",
             "Rainbow (Hessel et al. 2018) and Rainbow with one component off (Sec. 5, Fig. 3), each from its "
             "config under configs/ (what each switch reverts to is commented there). Scores are evaluation "
             "means (final: last evaluation; best: highest evaluation, optimistic), mean +- s.d. over seeds.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, group in groups.items():
        sub = table[table["variant"] == variant]
        final = sub["final_score"].to_numpy(dtype=np.float64)
        row = [f"`{variant}`", "-" if variant in (ABLATION_BASE, ABLATION_BASELINE) else _label(variant),
               ", ".join(str(r.seed) for r in group), f"{sub['frames_trained'].max():,.0f}",
               _mean_sd(final), _mean_sd(sub["best_score"].to_numpy(dtype=np.float64))]
        if has_hns:
            row.append(_mean_sd(100 * sub["final_hns"].to_numpy(dtype=np.float64)))
        delta = final.mean() - rainbow_final if variant != ABLATION_BASE and final.size else math.nan
        row.append("-" if not math.isfinite(delta) else f"{delta:+,.1f}")
        lines.append("| " + " | ".join(row) + " |")
    missing = [v for v in VARIANTS if v not in groups]
    if missing:
        lines += ["", f"No finished run yet for: {', '.join(missing)}."]
    lines += ["", f"![ablations]({png.name})", ""]
    md = out_dir / f"{display}.md"
    atomic_write_text(md, "\n".join(lines))
    return md, png


def _parse_seeds(text: str) -> list[int]:
    from dqn_atari.sweep import parse_seeds

    return parse_seeds(text)


def ablations_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dqn_atari ablations",
        description="Train Rainbow and its six ablations (Hessel et al. 2018, Fig. 3) on one game, resuming "
                    "unfinished runs, then draw the ablation figure and table under <results>/reports/ablations/.")
    parser.add_argument("--game", default="Breakout", help="game name (default Breakout)")
    parser.add_argument("--frames", default="", help="training budget in frames, e.g. 10M (default: the configs', 200M)")
    parser.add_argument("--seeds", default="1 2 3", help='seeds, e.g. "1 2 3" or 1-5 (default "1 2 3")')
    parser.add_argument("--smoke", action="store_true", help="tiny budget (configs/smoke.yaml), results under results/smoke/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run, e.g. device=cuda")
    args = parser.parse_args(argv)
    from dqn_atari.train import RunBusy, TrainingDiverged

    try:
        out = run_ablations(args.game, _parse_seeds(args.seeds), frames=parse_frames(args.frames), smoke=args.smoke,
                            overrides=args.overrides, progress=not args.no_progress)
    except (ConfigError, CheckpointError, TrainingDiverged, RunBusy, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, RunBusy):
            return exc.exit_status
        return 1 if isinstance(exc, (CheckpointError, TrainingDiverged)) else 2
    if out is None:  # stopped cleanly by a signal, like `train`: status 0, the message says to re-run
        return 0
    md, png = out
    print(f"Ablation table: {md}\nAblation figure: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(ablations_main())
