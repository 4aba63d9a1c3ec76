"""Paper-style tables (Markdown, LaTeX, CSV) under ``results/tables/``.

- ``runs.csv``: one row per finished run (final and best evaluation, raw and HNS).
- ``per_game.*`` / ``per_game_hns.*``: our variants side by side, one column per (variant, protocol, frame
  budget, final/best), each cell mean +- s.d. over seeds (n seeds).
- ``per_game_<variant>.*``: one variant next to the published scores of the matching algorithms
  (:mod:`dqn_atari.analysis.variants`), every column headed by its protocol, and whether our mean falls within
  Dopamine's published spread (+-1 s.d. over its 5 seeds) at our frame count; the papers' tables give no
  spread, so Dopamine's is the only one there is to check against.
- ``aggregates.*``: median / mean / IQM HNS and optimality gap with stratified-bootstrap 95 % CIs
  (Agarwal et al. 2021) and the count of games above human, next to the published aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dqn_atari.analysis.protocol import comparison_verdict, fmt_frames, parse_paper_protocol, start_kind
from dqn_atari.analysis.reference import DEFAULT_REFERENCE_ROOT, Reference, load_reference, warn_missing_hns
from dqn_atari.analysis.scores import (
    DEFAULT_RUNS_ROOT,
    SCORE_KINDS,
    Setting,
    per_game_hns,
    require_runs,
    run_table,
    settings_in,
    summarize,
)
from dqn_atari.analysis.stats import aggregate, has_interval
from dqn_atari.analysis.variants import variant_ref
from dqn_atari.rundir import atomic_write_csv, atomic_write_text

DEFAULT_TABLES_DIR = Path("results/tables")
FORMATS = ("md", "tex", "csv")
HNS_NOTE = ("HNS = (score - random) / (human - random); ours use the standard 57-game random/human table "
            "(atari_random_human.csv). Its Video Pinball random score, 16,257 (Nature's), leaves a human-random gap of "
            "1,411 points: a score far below or above it moves a mean by hundreds of points (and the optimality gap), "
            "where medians and IQMs hold; compare those.")
RECOMPUTED_NOTE = ("recomputed rows are medians and means of a paper's per-game scores. Their human-starts rows are "
                   "left out: they were normalized with the no-op random/human table, and human-starts papers use "
                   "the human-start one (Nair et al. 2015). A recomputed mean can be far from the printed one "
                   "(C51: 1767 % vs 701 %): the later papers' printed means take Video Pinball's random score as "
                   "about 0 (C51's mean is then 701.1 %), the standard table as 16,257, so compare medians.")
PUBLISHED_HNS_NOTE = ("published rows use the random/human table of their source (see Source), so rows from different "
                      "tables differ for the same scores: DQN's 49 Nature scores give median 93.5 % with the Nature "
                      "paper's table and 79.3 % with the standard one; compare ours with standard-table rows.")
KIND_NOTE = ("final eval = last evaluation of each run; best eval = highest evaluation mean during the run "
             "(best-snapshot reporting as in Nature 2015 and Rainbow; optimistic).")

# ------------------------------------------------------------------ rendering


def fmt_value(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}"


def fmt_mean_sd(mean: float, sd: float, n: int, scale: float = 1.0) -> str:
    """'412.3 +- 20.1 (n=3)'; no s.d. for a single seed."""
    if not math.isfinite(mean):
        return "-"
    spread = f" +- {fmt_value(sd * scale)}" if n > 1 and math.isfinite(sd) else ""
    return f"{fmt_value(mean * scale)}{spread} (n={n})"


def fmt_ci(point: float, low: float, high: float, scale: float = 1.0, digits: int = 1) -> str:
    return f"{point * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def fmt_point(point: float, low: float, high: float, scale: float = 1.0, digits: int = 1) -> str:
    """fmt_ci's place when there is no interval to show."""
    return f"{point * scale:.{digits}f} (no CI)"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
}


def _tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text)).replace("+-", r"$\pm$")


def _tex_cell(text: str) -> str:
    lines = str(text).split("\n")
    escaped = [_tex_escape(line) for line in lines]
    return escaped[0] if len(lines) == 1 else r"\shortstack{" + r" \\ ".join(escaped) + "}"


def render_markdown(df: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    out = [f"# {title}", ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    out.append("| " + " | ".join(_md_cell(c) for c in df.columns) + " |")
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(df.columns))) + "|")
    out += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.astype(str).itertuples(index=False)]
    return "\n".join(out) + "\n"


def render_latex(df: pd.DataFrame, title: str, notes: Sequence[str] = ()) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    spec = "l" + "r" * (len(df.columns) - 1)
    caption = " ".join([title + "."] + list(notes))
    out = [
        "% generated by dqn_atari.analysis.tables; needs \\usepackage{booktabs}",
        r"\begin{table}[t]", r"\centering", r"\small",
        rf"\caption{{{_tex_escape(caption)}}}",
        rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
        " & ".join(_tex_cell(c) for c in df.columns) + r" \\", r"\midrule",
    ]
    out += [" & ".join(_tex_cell(v) for v in row) + r" \\" for row in df.astype(str).itertuples(index=False)]
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def write_table(df: pd.DataFrame, out_dir: Path, name: str, title: str, notes: Sequence[str] = ()) -> list[Path]:
    """Write ``name.md``, ``name.tex`` and ``name.csv`` (CSV headers join the header lines with ' | ')."""
    paths = [out_dir / f"{name}.{ext}" for ext in FORMATS]
    atomic_write_text(paths[0], render_markdown(df, title, notes))
    atomic_write_text(paths[1], render_latex(df, title, notes))
    atomic_write_csv(paths[2], df.rename(columns=lambda c: str(c).replace("\n", " | ")))
    return paths


# ------------------------------------------------------------------ table contents


def setting_header(setting: Setting, kind: str, frames_trained: float | None = None) -> str:
    frames = fmt_frames(frames_trained if frames_trained else setting.frames_budget)
    return f"{setting.name}\n{SCORE_KINDS[kind]}\n{setting.protocol.label()}\n{frames} frames"


def game_rows(summary: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(game keys, display names) of the games in ``summary``, alphabetical."""
    names = summary.groupby("game_key")["game"].first()
    keys = sorted(names.index, key=lambda k: names[k].lower())
    return keys, [names[k] for k in keys]


def _new_column(table: pd.DataFrame, header: str) -> str:
    """``header``, primed until no column of ``table`` has it: two settings or paper protocols that differ only
    in what their labels leave out must not overwrite each other's column."""
    while header in table.columns:
        header += "'"
    return header


def per_game_table(summary: pd.DataFrame, settings: list[Setting], unit: str = "score") -> pd.DataFrame:
    """Games x (setting, final/best) cells of mean +- s.d. (n); ``unit`` 'score' (raw) or 'hns' (percent)."""
    scale = 100.0 if unit == "hns" else 1.0
    keys, names = game_rows(summary)
    table = pd.DataFrame({"Game": names})
    for setting in settings:
        sub = summary[summary["setting"] == setting].set_index("game_key")
        frames = float(sub["frames_trained"].max())
        for kind in SCORE_KINDS:
            col = f"{kind}_{unit}"
            table[_new_column(table, setting_header(setting, kind, frames))] = [
                fmt_mean_sd(sub.at[k, f"{col}_mean"], sub.at[k, f"{col}_std"], int(sub.at[k, "n_seeds"]), scale)
                if k in sub.index else "" for k in keys
            ]
    return table


def dopamine_at(reference: Reference, agent: str, dopamine_set: str, game: str, frames: float) -> pd.Series | None:
    """Dopamine's curve point nearest to ``frames`` (None below one iteration or when there is no curve)."""
    curve = reference.dopamine_curve(agent, game, dopamine_set)
    if curve.empty or frames < 0.5 * curve["frames"].iloc[0]:
        return None
    return curve.iloc[int(np.argmin(np.abs(curve["frames"].to_numpy() - frames)))]


def variant_table(
    summary: pd.DataFrame, variant: str, reference: Reference
) -> tuple[pd.DataFrame, list[str]]:
    """Per-game table of one variant next to its published scores; returns (table, notes)."""
    ref = variant_ref(variant)
    sub = summary[summary["variant"] == variant]
    settings = settings_in(sub)
    table = per_game_table(sub, settings)
    notes = [KIND_NOTE]
    keys, _ = game_rows(sub)
    for setting in settings if ref.dopamine_agent else []:
        # Like for like: Dopamine reports training-episode returns per 1M frames, so ours are the same figure.
        ours = sub[sub["setting"] == setting].set_index("game_key")["train_score_mean"]
        frames = float(sub.loc[sub["setting"] == setting, "frames_trained"].max())
        points = [dopamine_at(reference, ref.dopamine_agent, ref.dopamine_set, k, frames) for k in keys]
        at = next((p["frames"] for p in points if p is not None), None)
        head = (f"Dopamine {ref.dopamine_agent} ({ref.dopamine_set}) @ {fmt_frames(at)} frames\n"
                "sticky p=0.25, training returns\nmean +- s.d. over seeds")
        values = ["-" if p is None else f"{fmt_value(p['mean_return'])} +- {fmt_value(p['std_return'])}" for p in points]
        if head not in table.columns or table[head].tolist() != values:  # settings of one budget share this column
            table[_new_column(table, head)] = values
        within = (f"{setting.name} training returns\nof the last 1M frames:\nwithin Dopamine +-1 s.d.?\n"
                  f"({setting.protocol.name}, {fmt_frames(setting.frames_budget)} frames)")
        table[_new_column(table, within)] = [
            "n/a" if p is None or k not in ours.index or not np.isfinite(ours[k])
            else "yes" if abs(ours[k] - p["mean_return"]) <= p["std_return"] else "no"
            for k, p in zip(keys, points)
        ]
    if ref.dopamine_agent is not None:
        notes.append("Dopamine curves: training-episode returns with sticky actions (Machado et al. 2018). The "
                     "'within' check sets the same figure of ours beside them (the mean score of the training "
                     "episodes of our last 1M frames, mean over seeds), but our protocol and epsilon schedule may "
                     "still differ from Dopamine's: it flags gross mismatches only.")
    paper = reference.paper_rows(ref.paper_algorithms)
    paper = paper[paper["game_key"].isin(keys)]
    for (algorithm, protocol), rows in paper.groupby(["algorithm", "protocol"], sort=False):
        scores = rows.set_index("game_key")["score"]
        pp = parse_paper_protocol(protocol)
        header = _new_column(table, f"{algorithm}\n{pp.label()}")
        table[header] = [fmt_value(scores[k]) if k in scores.index else "-" for k in keys]
        verdicts = [comparison_verdict(setting.protocol, sub.loc[sub["setting"] == setting, "frames_trained"].max(),
                                       pp) for setting in settings]
        best = ("; the paper reports its best snapshot: compare with our best-eval column"
                if pp.reporting == "best snapshot" else "")
        notes.append(f"{algorithm}: protocol '{protocol}'; {'; '.join(verdicts)}{best}; "
                     f"source: {rows['source'].iloc[0]}")
    if paper.empty:
        notes.append(f"no published per-game scores are mapped for variant '{variant}' on these games.")
    notes.append("the papers' per-game tables give no spread over seeds.")
    return table, notes


def aggregates_table(
    runs: pd.DataFrame, reference: Reference, reps: int = 10_000, seed: int = 0
) -> pd.DataFrame:
    """Our aggregates per (setting, final/best) with 95 % CIs, then the published rows for our variants."""
    rows = []
    for setting in settings_in(runs):
        for kind in SCORE_KINDS:
            keys, per_game = per_game_hns(runs, setting, kind)
            missing = set(runs.loc[runs["setting"] == setting, "game_key"]) - set(keys)
            warn_missing_hns(missing, f"aggregates of {setting.label()}")
            if not per_game:
                continue
            est = aggregate(per_game, reps=reps, seed=seed)
            sub = runs[(runs["setting"] == setting) & runs["game_key"].isin(keys)]
            ci = fmt_ci if has_interval(per_game) else fmt_point
            rows.append({
                "Agent": setting.name, "Scores": SCORE_KINDS[kind], "Protocol": setting.protocol.label(),
                "Frames": fmt_frames(sub["frames_trained"].max()), "Games": len(keys), "Runs": len(sub),
                "Median HNS %": ci(*_e(est["median"]), scale=100),
                "Mean HNS %": ci(*_e(est["mean"]), scale=100),
                "IQM HNS %": ci(*_e(est["iqm"]), scale=100),
                "Optimality gap": ci(*_e(est["optimality_gap"]), digits=3),
                "Games > human": f"{est['above_human'].point:.0f} / {len(keys)}",
                "Source": "ours (95 % stratified bootstrap CI)",
            })
    published = reference.aggregates
    for variant in sorted(set(runs["variant"])):
        names = variant_ref(variant).aggregate_algorithms
        for _, row in published[published["algorithm"].isin(names)].iterrows():
            if row["kind"].startswith("recomputed (dqn_zoo") and start_kind(row["protocol"]) == "human":
                continue  # RECOMPUTED_NOTE
            rows.append({
                "Agent": row["algorithm"], "Scores": "published", "Protocol": row["protocol"], "Frames": row["frames"],
                "Games": row["n_games"], "Runs": "",
                "Median HNS %": fmt_value(row["median_hns_pct"]), "Mean HNS %": fmt_value(row["mean_hns_pct"]),
                "IQM HNS %": fmt_value(row["iqm_hns_pct"]), "Optimality gap": "-", "Games > human": "-",
                "Source": f"{row['kind']}: {row['source']}",
            })
    return pd.DataFrame(rows)


def _e(estimate) -> tuple[float, float, float]:
    return estimate.point, estimate.low, estimate.high


def write_tables(
    runs_root: str | Path = DEFAULT_RUNS_ROOT,
    reference_root: str | Path = DEFAULT_REFERENCE_ROOT,
    out_dir: str | Path = DEFAULT_TABLES_DIR,
    variants: list[str] | None = None,
    games: list[str] | None = None,
    reps: int = 10_000,
) -> list[Path]:
    """Write every table; returns the paths written. Raises ValueError when there are no finished runs."""
    reference = load_reference(reference_root)
    records = require_runs(runs_root, variants, games)
    out_dir = Path(out_dir)
    runs = run_table(records, reference)
    summary = summarize(runs)
    settings = settings_in(runs)
    atomic_write_csv(out_dir / "runs.csv", runs.assign(setting=runs["setting"].map(Setting.label)))
    paths = [out_dir / "runs.csv"]
    paths += write_table(per_game_table(summary, settings), out_dir, "per_game",
                         "Per-game scores of our runs (raw game score, mean +- s.d. over seeds)", [KIND_NOTE])
    paths += write_table(per_game_table(summary, settings, unit="hns"), out_dir, "per_game_hns",
                         "Per-game human-normalized scores of our runs (%, mean +- s.d. over seeds)",
                         [KIND_NOTE, HNS_NOTE])
    for variant in sorted(set(runs["variant"])):
        table, notes = variant_table(summary, variant, reference)
        paths += write_table(table, out_dir, f"per_game_{variant}",
                             f"{variant_ref(variant).label}: our scores next to published ones", notes)
    paths += write_table(aggregates_table(runs, reference, reps=reps), out_dir, "aggregates",
                         "Aggregate human-normalized scores", [HNS_NOTE, PUBLISHED_HNS_NOTE, RECOMPUTED_NOTE, KIND_NOTE,
                         "ours: point estimate [95 % stratified-bootstrap CI] (Agarwal et al. 2021; only where every "
                         "game has at least 2 runs: resampling within a game of one run has nothing to draw, so the "
                         "interval would describe the other games only); IQM pools all runs; optimality gap "
                         "at gamma = 1 (HNS units); games > human counts HNS > 100 % (Nature 2015's 'human level' "
                         "count uses >= 75 %); published rows cover their own game sets."])
    return paths
