"""Comparison figures (PNG and PDF under ``results/figures/``), drawn with matplotlib's Agg canvas.

Figures are built as ``matplotlib.figure.Figure`` objects and saved directly, so nothing here touches
pyplot's global backend: it works headless and does not disturb a notebook that imports it.

- ``curves_<Game>``: evaluation score vs frames per (variant, protocol): mean over seeds with a 95 %
  Student-t band, Dopamine's published curve (training returns, sticky actions) dashed in the same colour.
- ``aggregate_hns``: median and IQM of HNS over frames with stratified-bootstrap 95 % bands.
- ``rainbow_ablations``: the layout of Hessel et al. 2018, Fig. 3: median HNS over frames, Rainbow drawn
  rainbow-coloured, DQN grey, each ablation dashed.
- ``performance_profile``: fraction of runs with HNS above each level (Agarwal et al. 2021, Fig. 5 style),
  final and best evaluation, with bootstrap bands.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import seaborn as sns
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from dqn_atari.analysis.protocol import fmt_frames
from dqn_atari.analysis.reference import DEFAULT_REFERENCE_ROOT, Reference, load_reference, warn_missing_hns
from dqn_atari.analysis.scores import (
    DEFAULT_RUNS_ROOT,
    SCORE_KINDS,
    RunRecord,
    Setting,
    per_game_hns,
    require_runs,
    run_table,
    settings_in,
)
from dqn_atari.analysis.stats import METRICS, Strata, bootstrap, has_interval, performance_profile, t_interval
from dqn_atari.analysis.variants import ABLATION_BASE, ABLATION_BASELINE, VARIANTS, variant_ref
from dqn_atari.rundir import atomic_savefig

DEFAULT_FIGURES_DIR = Path("results/figures")
DOPAMINE_LABEL = "sticky actions, training returns, +-1 s.d."


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Figure, list]:
    """A Figure with seaborn's whitegrid style on its axes (no pyplot state involved)."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    with sns.axes_style("whitegrid"):
        axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    return fig, axes


def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    atomic_savefig(paths[0], fig, dpi=120)
    atomic_savefig(paths[1], fig)
    return paths


def legend_below(fig: Figure, ax) -> None:
    """One legend under the axes (long protocol labels would hide the data inside them)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncols = 1 if max(len(lab) for lab in labels) > 60 or len(labels) < 4 else 2
    fig.set_figheight(fig.get_figheight() + 0.22 * -(-len(labels) // ncols))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)


def palette(n: int) -> list:
    return sns.color_palette("tab10", max(n, 1))


def by_setting(records: list[RunRecord]) -> dict[Setting, list[RunRecord]]:
    groups: dict[Setting, list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[r.setting].append(r)
    return {s: groups[s] for s in sorted(groups, key=Setting.sort_key)}


def seed_matrix(records: list[RunRecord], curve: str = "curve") -> tuple[np.ndarray, np.ndarray]:
    """(frames grid = union of the seeds' frames, (n_seeds, n_frames) scores with NaN where a seed has none).

    ``curve``: the RunRecord attribute to read, ``curve`` (evaluations) or ``train_curve`` (training episodes).
    """
    curves = [getattr(r, curve) for r in records]
    grid = np.unique(np.concatenate([c["frames"].to_numpy(dtype=np.float64) for c in curves]))
    matrix = np.full((len(records), grid.size), np.nan)
    for i, c in enumerate(curves):
        matrix[i, np.searchsorted(grid, c["frames"].to_numpy(dtype=np.float64))] = c["mean_score"]
    return grid, matrix


def draw_dopamine(ax, reference: Reference, variant: str, game: str, color, max_frames: float) -> bool:
    """Overlay Dopamine's curve up to ~our frame count; False when there is none for this variant and game."""
    ref = variant_ref(variant)
    if ref.dopamine_agent is None:
        return False
    curve = reference.dopamine_curve(ref.dopamine_agent, game, ref.dopamine_set)
    curve = curve[curve["frames"] <= max(1.1 * max_frames, float(curve["frames"].min()) if len(curve) else 0)]
    if curve.empty:
        return False
    x, m, s = curve["frames"] / 1e6, curve["mean_return"], curve["std_return"]
    ax.plot(x, m, ls="--", color=color, lw=1.2, marker="." if len(curve) < 5 else None,
            label=f"Dopamine {ref.dopamine_agent} ({DOPAMINE_LABEL})")
    ax.fill_between(x, m - s, m + s, color=color, alpha=0.08, lw=0)
    return True


def plot_learning_curves(records: list[RunRecord], reference: Reference, out_dir: Path) -> list[Path]:
    """One figure per game: every (variant, protocol, budget) with a 95 % band over seeds, Dopamine dashed."""
    paths = []
    by_game: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_game[r.game_key].append(r)
    for key, recs in sorted(by_game.items()):
        fig, (ax,) = new_figure()
        groups = by_setting(recs)
        colors = palette(len(groups))
        max_frames = max(r.frames_trained for r in recs)
        overlaid = set()
        for (setting, group), color in zip(groups.items(), colors):
            grid, matrix = seed_matrix(group)
            mean, low, high = t_interval(matrix, axis=0)
            ax.plot(grid / 1e6, mean, color=color, lw=2, marker="o" if grid.size < 5 else None,
                    label=f"{setting.name} ({setting.protocol.label()}; n={len(group)})")
            ax.fill_between(grid / 1e6, low, high, color=color, alpha=0.2, lw=0)
            if setting.variant not in overlaid:
                overlaid.add(setting.variant)
                draw_dopamine(ax, reference, setting.variant, key, color, max_frames)
        ax.set(xlabel="frames (millions)", ylabel="evaluation score (episode mean)",
               title=f"{recs[0].game}: mean and 95 % CI over seeds")
        legend_below(fig, ax)
        paths += save(fig, out_dir, f"curves_{recs[0].game}")
    return paths


def hns_curves(records: list[RunRecord], reference: Reference) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """Per-run HNS interpolated onto one frames grid that every run covers.

    Returns (grid, game keys, per-game arrays of shape (n_runs_of_game, n_frames)); games without a
    human/random reference are dropped with a warning.
    """
    usable = [r for r in records if reference.has_hns(r.game_key)]
    warn_missing_hns({r.game for r in records} - {r.game for r in usable}, "HNS curves")
    if not usable:
        return np.zeros(0), [], []
    lo = max(float(r.curve["frames"].min()) for r in usable)
    hi = min(float(r.curve["frames"].max()) for r in usable)
    grid = np.unique(np.concatenate([r.curve["frames"].to_numpy(dtype=np.float64) for r in usable]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    per_game: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in usable:
        hns = reference.hns(r.curve["mean_score"].to_numpy(), [r.game_key] * len(r.curve))
        per_game[r.game_key].append(np.interp(grid, r.curve["frames"].to_numpy(dtype=np.float64), hns))
    keys = sorted(per_game)
    return grid, keys, [np.stack(per_game[k]) for k in keys]


def aggregate_over_frames(
    grid: np.ndarray, per_game: list[np.ndarray], metric: str, reps: int, with_ci: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point, low, high) of an aggregate metric at every grid point (CIs NaN when ``with_ci`` is False)."""
    out = np.full((3, grid.size), np.nan)
    for t in range(grid.size):
        strata = Strata([g[:, t] for g in per_game])
        if with_ci:
            out[:, t] = bootstrap(strata, METRICS[metric], reps=reps)
        else:
            out[0, t] = METRICS[metric](strata.values, strata)
    return out[0], out[1], out[2]


NO_BAND = "; no band: a game has 1 run"  # legend note where stats.has_interval is False


def plot_aggregate_hns(records: list[RunRecord], reference: Reference, out_dir: Path, reps: int = 500) -> list[Path]:
    """Median and IQM HNS over frames per (variant, protocol, budget), with stratified-bootstrap 95 % bands for
    the settings whose every game has at least 2 runs (stats.has_interval). Settings run on different games are
    drawn each over its own games (the legend counts them), with a warning: their levels are not comparable."""
    fig, axes = new_figure(1, 2)
    groups, game_sets = by_setting(records), set()
    for (setting, group), color in zip(groups.items(), palette(len(groups))):
        grid, keys, per_game = hns_curves(group, reference)
        if not keys:
            continue
        game_sets.add(tuple(keys))
        with_ci = has_interval(per_game)
        for ax, metric in zip(axes, ("median", "iqm")):
            point, low, high = aggregate_over_frames(grid, per_game, metric, reps, with_ci=with_ci)
            ax.plot(grid / 1e6, 100 * point, color=color, lw=2, marker="o" if grid.size < 5 else None,
                    label=f"{setting.name} ({setting.protocol.label()}; {len(keys)} games"
                          f"{'' if with_ci else NO_BAND})")
            if with_ci:
                ax.fill_between(grid / 1e6, 100 * low, 100 * high, color=color, alpha=0.2, lw=0)
    mixed = len(game_sets) > 1
    if mixed:
        warnings.warn("aggregate_hns: the settings were run on different games, so their median/IQM curves are "
                      "not comparable (the legend gives each one's game count)", stacklevel=2)
    for ax, metric in zip(axes, ("median", "IQM")):
        ax.set(xlabel="frames (millions)", ylabel=f"{metric} human-normalized score (%)",
               title=f"{metric} HNS over games, 95 % stratified-bootstrap CI"
                     + ("\n(settings cover different games)" if mixed else ""))
        ax.axhline(100, color="0.5", lw=0.8, ls=":")
    legend_below(fig, axes[0])
    return save(fig, out_dir, "aggregate_hns")


def _rainbow_line(ax, x: np.ndarray, y: np.ndarray, label: str) -> None:
    """A line whose colour runs through the spectrum, as Rainbow is drawn in Hessel et al. 2018."""
    if x.size < 2:
        ax.plot(x, y, "o", color="purple", label=label)
        return
    pts = np.column_stack([x, y]).reshape(-1, 1, 2)
    lc = LineCollection(np.concatenate([pts[:-1], pts[1:]], axis=1), cmap="rainbow", lw=3.5, label=label)
    lc.set_array(np.linspace(0, 1, x.size - 1))
    ax.add_collection(lc)
    ax.autoscale_view()


def plot_rainbow_ablations(records: list[RunRecord], reference: Reference, out_dir: Path) -> list[Path]:
    """Hessel et al. 2018, Fig. 3 layout; [] when there are no Rainbow or ablation runs.

    Every line is a median over the same games: those that every Rainbow and ablation setting has runs on (a
    median over other games would not be comparable). DQN settings are drawn when they cover all of them."""
    wanted = {ABLATION_BASE, ABLATION_BASELINE} | {v for v, ref in VARIANTS.items() if ref.ablation}
    groups = {s: g for s, g in by_setting(records).items() if s.variant in wanted}
    if not any(s.variant == ABLATION_BASE or variant_ref(s.variant).ablation for s in groups):
        return []
    games = {s: {r.game_key for r in g if reference.has_hns(r.game_key)} for s, g in groups.items()}
    common = set.intersection(*(k for s, k in games.items() if s.variant != ABLATION_BASELINE))
    if not common:
        warnings.warn("rainbow_ablations: no game with a human-normalized score has runs of every Rainbow and "
                      "ablation setting found, so their medians cannot be compared; figure skipped", stacklevel=2)
        return []
    groups = {s: [r for r in g if r.game_key in common] for s, g in groups.items() if common <= games[s]}
    protocols, budgets = {s.protocol for s in groups}, {s.frames_budget for s in groups}
    fig, (ax,) = new_figure(size=(7.0, 4.5))
    ablation_colors = iter(palette(10))
    baseline_styles = iter(["-", ":", "-.", (0, (1, 3))] * 4)
    for setting, group in groups.items():
        grid, keys, per_game = hns_curves(group, reference)
        if not keys:
            continue
        median = 100 * aggregate_over_frames(grid, per_game, "median", reps=0, with_ci=False)[0]
        ref = variant_ref(setting.variant)
        label = ("Rainbow" if setting.variant == ABLATION_BASE else "DQN" if setting.variant == ABLATION_BASELINE
                 else ref.ablation or setting.variant)
        if len(protocols) > 1:
            label += f" ({setting.protocol.name})"
        if len(budgets) > 1:
            label += f" [{fmt_frames(setting.frames_budget)} frames]"
        if setting.distinction:
            label += f" ({setting.distinction})"
        x = grid / 1e6
        if setting.variant == ABLATION_BASE:
            _rainbow_line(ax, x, median, label)
        elif setting.variant == ABLATION_BASELINE:
            ax.plot(x, median, color="0.55", lw=2, ls=next(baseline_styles), label=label)
        else:
            ax.plot(x, median, ls="--", lw=1.6, color=next(ablation_colors), label=label)
    ax.axhline(100, color="0.5", lw=0.8, ls=":")
    ax.set(xlabel="frames (millions)", ylabel="median human-normalized score (%)",
           title=f"Rainbow ablations: median HNS over {len(common)} game(s) (Hessel et al. 2018, Fig. 3 layout)")
    ax.legend(fontsize="small", loc="upper left")
    return save(fig, out_dir, "rainbow_ablations")


def plot_performance_profiles(records: list[RunRecord], reference: Reference, out_dir: Path,
                              reps: int = 1000) -> list[Path]:
    """Fraction of runs with HNS > tau, final and best evaluation, bootstrap 95 % bands."""
    runs = run_table(records, reference)
    finite = runs[["final_hns", "best_hns"]].to_numpy()
    finite = finite[np.isfinite(finite)]
    tau_max = float(np.clip(np.quantile(finite, 0.95) * 1.2, 2.0, 8.0)) if finite.size else 2.0
    taus = np.linspace(0.0, tau_max, 121)
    fig, axes = new_figure(1, 2)
    settings = settings_in(runs)
    for setting, color in zip(settings, palette(len(settings))):
        for ax, kind in zip(axes, SCORE_KINDS):
            keys, per_game = per_game_hns(runs, setting, kind)
            if not keys:
                continue
            profile, low, high = performance_profile(per_game, taus, reps=reps)
            with_ci = has_interval(per_game)
            ax.plot(taus, profile, color=color, lw=2, label=f"{setting.name} ({setting.protocol.label()}; "
                    f"{len(keys)} games{'' if with_ci else NO_BAND})")
            if with_ci:
                ax.fill_between(taus, low, high, color=color, alpha=0.2, lw=0)
    for ax, kind in zip(axes, SCORE_KINDS):
        ax.axvline(1.0, color="0.5", lw=0.8, ls=":")
        ax.set(xlabel=r"human-normalized score $\tau$", ylabel=r"fraction of runs with score > $\tau$",
               ylim=(-0.02, 1.02), title=f"Performance profile, {SCORE_KINDS[kind]}")
    legend_below(fig, axes[0])
    return save(fig, out_dir, "performance_profile")


def plot_game_report(records: list[RunRecord], reference: Reference, path: Path) -> Path:
    """Per-game report figure: each seed thin, the mean bold, Dopamine's curve dashed behind.

    Dopamine's curves average training episodes, so our own training episodes, averaged the same way per 1M
    frames (mean over seeds), are drawn dotted beside them: the like-for-like comparison.
    """
    fig, (ax,) = new_figure()
    groups = by_setting(records)
    max_frames = max(r.frames_trained for r in records)
    for (setting, group), color in zip(groups.items(), palette(len(groups))):
        grid, matrix = seed_matrix(group)
        for r in group:
            ax.plot(r.curve["frames"] / 1e6, r.curve["mean_score"], color=color, lw=0.7, alpha=0.6,
                    marker="." if len(r.curve) < 5 else None)
        mean = np.nanmean(matrix, axis=0)
        ax.plot(grid / 1e6, mean, color=color, lw=2.5, marker="o" if grid.size < 5 else None,
                label=f"ours{f' ({setting.distinction})' if setting.distinction else ''}, {setting.protocol.label()}: "
                      f"mean of {len(group)} seed(s)")
        grid, matrix = seed_matrix(group, "train_curve")
        if grid.size:
            ax.plot(grid / 1e6, np.nanmean(matrix, axis=0), color=color, lw=1.5, ls=":", marker=".",
                    label="ours, training episodes (exploring), mean per 1M frames")
    (setting, _), color = next(iter(groups.items())), palette(1)[0]
    if not draw_dopamine(ax, reference, setting.variant, records[0].game_key, color, max_frames):
        ax.plot([], [], " ", label="no Dopamine curve for this variant and game")
    progress = "" if all(r.done for r in records) else f", unfinished: {max_frames / 1e6:.2f}M frames\n"
    ax.set(xlabel="frames (millions)", ylabel="score (episode mean)",
           title=f"{records[0].game}: {records[0].variant}{progress} (thin: seeds; bold: mean)")
    legend_below(fig, ax)
    atomic_savefig(path, fig, dpi=120)
    return path


def write_plots(
    runs_root: str | Path = DEFAULT_RUNS_ROOT,
    reference_root: str | Path = DEFAULT_REFERENCE_ROOT,
    out_dir: str | Path = DEFAULT_FIGURES_DIR,
    variants: list[str] | None = None,
    games: list[str] | None = None,
    reps: int = 1000,
) -> list[Path]:
    """Draw every figure; returns the paths written. Raises ValueError when there are no finished runs."""
    reference = load_reference(reference_root)
    records = require_runs(runs_root, variants, games)
    out_dir = Path(out_dir)
    paths = plot_learning_curves(records, reference, out_dir)
    paths += plot_aggregate_hns(records, reference, out_dir, reps=max(100, reps // 2))
    paths += plot_rainbow_ablations(records, reference, out_dir)
    paths += plot_performance_profiles(records, reference, out_dir, reps=reps)
    return paths
