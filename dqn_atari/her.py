"""The bit-flipping experiment of hindsight experience replay (Andrychowicz et al. 2017, Sec. 3.1, Fig. 1):
the success rate of DQN with and without HER against the number of bits n.

``python -m dqn_atari.her [--bits "5 10 15 20 25"] [--seeds "1 2 3"] [--episodes 4000] [key=value ...]``
(``make her BITS=... SEEDS=... EPISODES=...``) trains ``configs/control/bitflip_dqn.yaml`` and
``configs/control/bitflip_her.yaml`` on ``BitFlip<n>`` for every n and seed, each run for the same number of
episodes (n agent steps each), through the one training loop (``train``), a few runs at a time in separate
processes (one per CPU core). Finished runs are skipped and interrupted ones resume, so re-running the command is
the recovery. Then it writes

    results/reports/her/bitflip.png   success rate against n, mean over seeds (Fig. 1's layout)
    results/reports/her/bitflip.md    the table, with the settings
    results/reports/her/bitflip.csv   one row per run

A run's success rate is its final evaluation: 100 greedy test episodes at the end of its budget, an episode
succeeding when the goal was reached at any step (Appendix A).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dqn_atari.config import Config, ConfigError, apply_overrides, check_recorded_config, load_config
from dqn_atari.envs import env_display_name
from dqn_atari.progress import progress_bar
from dqn_atari.rundir import RunDir, atomic_savefig, atomic_write_csv, atomic_write_text
from dqn_atari.sweep import parse_seeds, words

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "control"
VARIANTS = {"bitflip_dqn": "DQN", "bitflip_her": "DQN+HER"}  # config file -> label in Fig. 1
DEFAULT_BITS = (5, 10, 15, 20, 25)
# DEVIATION: runs of 4,000 episodes (250 cycles of 16), the paper's 200 epochs x 800 episodes would take days
# on 2 CPU cores. The default set (5 bit counts x 2 variants x 3 seeds) took 4.1 minutes on 2 cores (README).
DEFAULT_EPISODES = 4000
OUT_DIR = Path("results/reports/her")


def her_configs(bits: Sequence[int], seeds: Sequence[int], episodes: int, overrides: Sequence[str] = ()) -> list[Config]:
    """One config per (variant, n, seed): the variant's file, ``BitFlip<n>``, a budget of ``episodes`` episodes."""
    if episodes < 1 or not bits or min(bits) < 1:
        raise ValueError(f"need at least one episode and bit counts >= 1, got episodes={episodes}, bits={list(bits)}.")
    given = apply_overrides({}, list(overrides))  # resolves bare keys to their paths
    refused = ([k for k in ("seed",) if k in given] + [f"env.{k}" for k in ("game",) if k in given.get("env", {})]
               + [f"train.{k}" for k in ("frames",) if k in given.get("train", {})]
               + [f"replay.{k}" for k in given.get("replay", {}) if k.startswith("her")])
    if refused:
        raise ConfigError(f"Remove {', '.join(refused)} from the overrides: the experiment sets the seeds, games and "
                          f"budgets (--seeds, --bits, --episodes), and hindsight replay's settings would reach the "
                          f"DQN baseline too (change them in {CONFIGS / 'bitflip_her.yaml'}, or a copy).")
    return [load_config(CONFIGS / f"{variant}.yaml",
                        [*overrides, f"env.game=BitFlip{n}", f"seed={seed}", f"train.frames={episodes * n}"])
            for variant in VARIANTS for n in bits for seed in seeds]


def _train(cfg: Config) -> bool:
    import contextlib

    from dqn_atari.train import train

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the bar reports progress
        return train(cfg, progress=False).is_done


def _run_dir(cfg: Config) -> RunDir:
    return RunDir.for_run(cfg.runs_root, cfg.variant, env_display_name(cfg.env.game), cfg.seed)


def _steps_done(cfg: Config) -> int:
    """Agent steps a run has logged (train.csv is appended at every finished episode)."""
    run = _run_dir(cfg)
    if run.is_done:
        return cfg.train.frames
    train = run.train if (run.path / "train.csv").exists() else None
    return int(train["agent_step"].iloc[-1]) if train is not None and len(train) else 0


def train_all(configs: list[Config], workers: int, progress: bool = True) -> bool:
    """Train every run, ``workers`` at a time in their own processes, longest first. A tqdm bar counts the agent
    steps of all runs (read from their train.csv) with an ETA. Returns False when a run stopped early (a signal)."""
    for cfg in configs:  # a finished run is skipped below: it must be of this config, as train would check
        run = _run_dir(cfg)
        if run.is_done:
            check_recorded_config(run.config, cfg, run.path / "config.yaml", done=True)
    todo = sorted((c for c in configs if not _run_dir(c).is_done), key=lambda c: -c.train.frames)
    total = sum(c.train.frames for c in configs)
    bar = progress_bar(total=total, unit="step", unit_scale=True, smoothing=0.0, disable=not progress,
                       desc=f"make her: {len(configs)} runs", initial=total - sum(c.train.frames for c in todo))
    finished = True
    # spawn: a fresh interpreter per worker, so no torch state is inherited; one torch thread each (the configs'
    # torch_threads: 1), so `workers` runs use `workers` cores.
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(_train, cfg): cfg for cfg in todo}
        running = set(pending)
        while running:
            done, running = wait(running, timeout=2.0, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    finished &= future.result()  # a worker's exception (a diverged run, a bad config) ends the command
                except BaseException:
                    for other in running:  # runs not started yet are not started (the running ones finish)
                        other.cancel()
                    raise
            bar.n = sum(_steps_done(c) for c in configs)
            bar.refresh()
    bar.close()
    return finished


def success_table(configs: list[Config]) -> pd.DataFrame:
    """One row per finished run: its final success rate over the final evaluation's test episodes."""
    rows = []
    for cfg in configs:
        run = _run_dir(cfg)
        if not run.is_done:
            continue
        final = run.eval.iloc[-1]
        n = int(env_display_name(cfg.env.game).removeprefix("BitFlip"))
        scores = np.asarray(final["scores"], dtype=np.float64)
        rows.append({"variant": cfg.variant, "label": VARIANTS.get(cfg.variant, cfg.variant), "bits": n,
                     "seed": cfg.seed, "her_strategy": cfg.replay.her_strategy, "double": cfg.agent.double,
                     "episodes": cfg.train.frames // n, "agent_steps": int(final["agent_step"]),
                     "test_episodes": scores.size, "success_rate": float(np.mean(scores > -n)),  # BitFlip.succeeded
                     "wall_time_s": float(run.done_summary.get("wall_time_s", float("nan")))})
    return pd.DataFrame(rows)


def plot_success(table: pd.DataFrame, path: Path) -> Path:
    """Fig. 1's layout: success rate against the number of bits, one line per variant (mean over seeds, the
    band spans the seeds' lowest and highest, dots are single seeds)."""
    from dqn_atari.analysis.plots import new_figure, palette

    fig, (ax,) = new_figure(size=(6.0, 4.0))
    for (variant, group), color in zip(table.groupby("variant", sort=False), palette(table["variant"].nunique())):
        stats = group.groupby("bits")["success_rate"].agg(["mean", "min", "max", "count"])
        label = f"{group['label'].iloc[0]} ({stats['count'].max()} seeds)"
        ax.plot(stats.index, stats["mean"], marker="o", color=color, label=label)
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.15, lw=0)
        ax.scatter(group["bits"], group["success_rate"], color=color, s=8, alpha=0.6)
    episodes = ", ".join(str(e) for e in sorted(table["episodes"].unique()))
    ax.set(xlabel="number of bits n", ylabel="success rate", ylim=(-0.03, 1.03),
           title=f"Bit flipping, {episodes} episodes per run (Andrychowicz et al. 2017, Fig. 1 layout)")
    ax.title.set_fontsize(9)
    ax.set_xticks(sorted(table["bits"].unique()))
    ax.legend(loc="center right")
    atomic_savefig(path, fig, dpi=120)
    return path


def write_report(configs: list[Config], out_dir: Path = OUT_DIR) -> tuple[Path, Path, Path]:
    """bitflip.csv (per run), bitflip.md (per n and variant, mean +- s.d. over seeds) and bitflip.png."""
    table = success_table(configs)
    if table.empty:
        raise ValueError("no finished bit-flipping run to report; train them first (make her)")
    csv = out_dir / "bitflip.csv"
    atomic_write_csv(csv, table.drop(columns="label"))
    png = plot_success(table, out_dir / "bitflip.png")
    labels = list(dict.fromkeys(table["label"]))
    strategies = ", ".join(sorted(set(table["her_strategy"]) - {"none"})) or "none"
    lines = ["# Bit flipping: DQN with and without hindsight experience replay", "",
             "Andrychowicz et al. 2017, Sec. 3.1, Fig. 1 (`make her`; settings and deviations in "
             "configs/control/bitflip_*.yaml and README.md). Success rate of the final greedy test, "
             f"{int(table['test_episodes'].max())} episodes, mean +- s.d. over seeds (per seed in bitflip.csv). "
             f"Each run: {', '.join(str(e) for e in sorted(table['episodes'].unique()))} training episodes; "
             f"HER strategy: {strategies}.",
             "", "| n bits | " + " | ".join(labels) + " | minutes per run |", "|---|" + "---|" * (len(labels) + 1)]
    for n, group in table.groupby("bits"):
        cells = []
        for label in labels:
            rates = group.loc[group["label"] == label, "success_rate"].to_numpy()
            cells.append("-" if rates.size == 0 else f"{rates.mean():.2f}" + (f" +- {rates.std(ddof=1):.2f}"
                                                                              if rates.size > 1 else ""))
        minutes = group["wall_time_s"].mean() / 60
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    lines += ["", f"![success rate against the number of bits]({png.name})", ""]
    md = out_dir / "bitflip.md"
    atomic_write_text(md, "\n".join(lines))
    return md, png, csv


def her_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dqn_atari.her",
        description="Hindsight experience replay's bit-flipping experiment (Andrychowicz et al. 2017, Fig. 1): train "
                    "DQN with and without HER for each number of bits and seed, then write "
                    "results/reports/her/bitflip.{png,md,csv}.")
    parser.add_argument("--bits", default=" ".join(map(str, DEFAULT_BITS)), help='bit counts, e.g. "5 10 15 20 25"')
    parser.add_argument("--seeds", default="1 2 3", help='seeds, e.g. "1 2 3" or 1-5 (default "1 2 3")')
    parser.add_argument("--episodes", default="", help=f"training episodes per run (default {DEFAULT_EPISODES})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs at once (default: CPU cores)")
    parser.add_argument("--out", default=str(OUT_DIR), help=f"report directory (default {OUT_DIR})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. agent.double=true "
                                                     "runs_root=results/her/double (a new runs_root keeps runs apart; "
                                                     "give --out too, or the default report is replaced)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:
        bits = _integers("--bits", args.bits)
        episodes = _integers("--episodes", args.episodes, one=True) if str(args.episodes).strip() else DEFAULT_EPISODES
        configs = her_configs(bits, parse_seeds(args.seeds), episodes, args.overrides)
        if not train_all(configs, args.workers, progress=not args.no_progress):
            print("A run stopped before its budget; re-run the same command to resume.")
            return 0
        md, png, csv = write_report(configs, Path(args.out))
    except KeyboardInterrupt:  # the workers got the signal too: each has checkpointed its run
        print("\nInterrupted; re-run the same command to resume.")
        return 130
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a diverged run (TrainingDiverged) or a checkpoint that cannot be used
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(md.read_text())
    print(f"Table: {md} and {csv}\nFigure: {png}\n({len(configs)} runs, {(time.perf_counter() - started) / 60:.1f} "
          f"minutes)")
    return 0


def _integers(option: str, text: str, one: bool = False):
    """The whole numbers in ``text`` (separated by spaces or commas); with ``one``, the single number it holds."""
    try:
        numbers = [int(word) for word in words(text)]
    except ValueError:
        numbers = []
    if not numbers or (one and len(numbers) != 1):
        what = "one whole number" if one else "whole numbers (several separated by spaces)"
        raise ValueError(f"{option} takes {what}; got {text!r}.")
    return numbers[0] if one else numbers


if __name__ == "__main__":
    raise SystemExit(her_main())
