"""Per-game report written by ``make reproduce``: our scores next to the paper's, and a learning-curve figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dqn_atari.analysis.plots import plot_game_report
from dqn_atari.analysis.protocol import comparison_verdict, fmt_frames, parse_paper_protocol
from dqn_atari.analysis.reference import DEFAULT_REFERENCE_ROOT, load_reference
from dqn_atari.analysis.scores import DEFAULT_RUNS_ROOT, load_runs, run_table, settings_in
from dqn_atari.analysis.tables import fmt_value
from dqn_atari.analysis.variants import variant_ref
from dqn_atari.rundir import RunDir, atomic_write_text

DEFAULT_REPORTS_DIR = Path("results/reports")


def _spread(values: np.ndarray) -> str:
    """'412.3 +- 20.1 (min 390, max 430)' over seeds; the value alone for one seed."""
    if values.size == 1:
        return f"{fmt_value(values[0])} (one seed)"
    return (f"{fmt_value(values.mean())} +- {fmt_value(values.std(ddof=1))} "
            f"(min {fmt_value(values.min())}, max {fmt_value(values.max())})")


# Dopamine's defaults in its agents' gin files (results/reference/SOURCES.md): epsilon_train 0.01,
# epsilon_decay_period 250k and min_replay_history 20k agent steps; its decay starts after the warm-up, as ours does.
DOPAMINE_EXPLORATION = "epsilon 1 to 0.01 over 1M frames after 80k frames of random play"


def exploration(run_path: Path) -> str:
    """Our run's exploration schedule, in frames, from its config.yaml and protocol.json."""
    run = RunDir(run_path)
    config, frame_skip = run.config, int(run.protocol.get("frame_skip", 4))
    if (config.get("network") or {}).get("noisy"):
        return "noisy nets, epsilon 0"
    t = config.get("train") or {}
    if not {"epsilon_start", "epsilon_end", "epsilon_decay_steps", "replay_start_steps"} <= t.keys():
        return "its exploration schedule is not in its config.yaml"
    return (f"epsilon {t['epsilon_start']:g} to {t['epsilon_end']:g} over {fmt_frames(t['epsilon_decay_steps'] * frame_skip)} "
            f"frames after {fmt_frames(t['replay_start_steps'] * frame_skip)} frames of random play")


def write_game_report(
    variant: str,
    game: str,
    runs_root: str | Path = DEFAULT_RUNS_ROOT,
    reference_root: str | Path = DEFAULT_REFERENCE_ROOT,
    out_dir: str | Path = DEFAULT_REPORTS_DIR,
    unfinished: bool = False,
) -> tuple[Path, Path]:
    """Write ``out_dir/<variant>/<game>.md`` and ``.png``; returns (md_path, png_path).

    ``unfinished``: runs still training are reported too, each at its latest evaluation, and the report says so.
    Raises ValueError when there is no finished run of ``variant`` on ``game`` under ``runs_root``.
    """
    reference = load_reference(reference_root)
    records = load_runs(runs_root, variants=[variant], games=[game], unfinished=unfinished)
    if not records:
        raise ValueError(f"no {'evaluated' if unfinished else 'finished'} run of variant '{variant}' on game "
                         f"'{game}' under {runs_root}; expected {Path(runs_root) / variant / game}/seed<k>/ with "
                         + ("an eval.csv" if unfinished else "a DONE marker (--unfinished reports runs still training)"))
    display = records[0].game
    md_path = Path(out_dir) / variant / f"{display}.md"
    png_path = Path(out_dir) / variant / f"{display}.png"
    runs = run_table(records, reference)
    ref = variant_ref(variant)
    training = sorted(r.seed for r in records if not r.done)
    lines = [f"# {display}: {variant} ({ref.label})" + (" — unfinished" if training else ""), ""]
    if training:
        lines += [f"**Not finished:** seed(s) {', '.join(map(str, training))} had not reached their budget when this "
                  "was written. For them, \"final\" below is their latest periodic evaluation (cut at its step budget), "
                  "not the end-of-training evaluation, which plays all its episodes to their end.", ""]

    lines += ["## Our runs", ""]
    for setting in settings_in(runs):
        sub = runs[runs["setting"] == setting].sort_values("seed")
        lines += [
            f"### Protocol `{setting.protocol.name}`" + (f" ({setting.distinction})" if setting.distinction else ""),
            "",
            f"- protocol: {setting.protocol.label()}",
            f"- seeds: {len(sub)} ({', '.join(str(s) for s in sub['seed'])})",
            f"- frames trained: {fmt_frames(sub['frames_trained'].max())} "
            f"(budget {fmt_frames(setting.frames_budget)})",
            f"- final evaluation score{' (latest, for unfinished seeds)' if training else ''}: "
            f"{_spread(sub['final_score'].to_numpy())}",
            f"- best evaluation score (max over evaluations, optimistic): {_spread(sub['best_score'].to_numpy())}",
        ]
        if reference.has_hns(game):
            lines.append(f"- final / best human-normalized score: {100 * sub['final_hns'].mean():.1f} % / "
                         f"{100 * sub['best_hns'].mean():.1f} % (standard table, mean over seeds)")
        lines.append("")
    forced = [(r.seed, change) for r in records for change in RunDir(r.path).config_changes]
    if forced:
        lines += ["**Resumed with another config (force=true).** The settings above are each run's newest; the steps "
                  "before each change ran with the recorded values:", ""]
        lines += [f"- seed {seed}, from agent step {change.get('agent_step', 0):,}: {'; '.join(change.get('changes', []))}"
                  for seed, change in forced] + [""]

    lines += ["## Published scores", ""]
    paper = reference.paper_rows(ref.paper_algorithms, game)
    if paper.empty:
        why = (f"There is no published score for {display} among {', '.join(ref.paper_algorithms)} in "
               f"paper_scores.csv" if ref.paper_algorithms
               else f"No paper's algorithm in paper_scores.csv is mapped to variant '{variant}'")
        lines += [f"{why}, so there is nothing to compare against here.", ""]
    for _, row in paper.iterrows():
        pp = parse_paper_protocol(row["protocol"])
        lines += [f"- **{row['algorithm']}**: {fmt_value(row['score'])}",
                  f"  - protocol: {row['protocol']}", f"  - source: {row['source']}"]
        for setting in settings_in(runs):
            frames = runs.loc[runs["setting"] == setting, "frames_trained"].max()
            lines.append(f"  - this protocol {comparison_verdict(setting.protocol, frames, pp, quote='`')}")
        if pp.reporting == "best snapshot":
            lines.append("  - the paper reports its best snapshot: compare with our best evaluation score")
    if ref.dopamine_agent:
        curve = reference.dopamine_curve(ref.dopamine_agent, game, ref.dopamine_set)
        lines += ["", f"Dopamine {ref.dopamine_agent} ({ref.dopamine_set}) curve: "
                  + (f"drawn dashed in the figure. It averages training episodes per 1M frames, with sticky actions "
                     f"and Dopamine's schedule ({DOPAMINE_EXPLORATION}), so compare it with our training episodes "
                     f"(dotted, averaged the same way; {exploration(records[0].path)}), not with our evaluations. "
                     "Where the schedules differ, the curves are expected to differ early in training."
                     if len(curve) else f"none published for {display}.")]
    else:
        lines += ["", f"No Dopamine curve is mapped for variant '{variant}'."]
    lines += ["", f"![learning curve]({png_path.name})", ""]

    atomic_write_text(md_path, "\n".join(lines))
    plot_game_report(records, reference, png_path)
    return md_path, png_path
