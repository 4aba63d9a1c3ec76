"""Command line: ``python -m dqn_atari <command> ...`` (see ``--help`` of each command)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from dqn_atari.config import (
    Config, ConfigError, apply_overrides, config_from_dict, deep_merge, describe_fields, find_variant_config,
    parse_frames, parse_override, read_yaml,
)

# Not config keys: `seeds=[1,2,3,4]` and `games=[Pong,Breakout]` ask for several runs, trained in one process.
RUN_LIST_KEYS = ("seeds", "games")


def _keys_help() -> str:
    lines = ["config keys (key=value overrides; bare names work when unique, e.g. lr=1e-4; integers as 10M, 500k "
             "or 1e6 too):"]
    for key, default, doc in describe_fields():
        lines.append(f"  {key} (default {default})")
        if doc:
            lines.extend("      " + line for line in textwrap.wrap(" ".join(doc.split()), 96))
    return "\n".join(lines)


def build_config(config_path: str | Path | None, overrides: list[str], smoke: bool = False,
                 extra: dict | None = None) -> Config:
    """YAML file, then the smoke settings (if asked), then ``extra`` (from make variables), then overrides."""
    data = read_yaml(config_path) if config_path else {}
    if smoke:
        data = deep_merge(data, read_yaml("configs/smoke.yaml"))
    if extra:
        data = deep_merge(data, extra)
    data = apply_overrides(data, overrides)
    return config_from_dict(data, where=str(config_path or "the command line"))


def split_run_lists(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Take ``seeds=[1,2,3]`` / ``games=[Pong,Breakout]`` (also ``seeds=1,2,3``) out of the overrides."""
    rest, lists = [], {}
    for text in overrides:
        key, value = parse_override(text) if "=" in text else (text, None)
        if key not in RUN_LIST_KEYS:
            rest.append(text)
            continue
        items = value if isinstance(value, list) else str(value).replace(",", " ").split()
        if not items:
            raise ConfigError(f"{key}= needs at least one value, e.g. {key}=[1,2,3,4].")
        lists[key] = [str(v).strip() for v in items]
    return rest, lists


def refuse_axis_overrides(overrides: list[str], seeds_from: str | None, games_from: str | None) -> None:
    """A ``seed=`` or ``env.game=`` override that the run lists (``seeds_from``, ``games_from``: where they come
    from, None if not given) would silently replace: a ConfigError."""
    given = apply_overrides({}, list(overrides))  # resolves bare keys ("seed", "game") to their paths
    axes = (("seed=", "seed", seeds_from, "seed" in given),
            ("env.game=", "game", games_from, "game" in given.get("env", {})))
    clashes = [(key, f"{where} sets every run's {what}") for key, what, where, set_ in axes if where and set_]
    if clashes:
        raise ConfigError(f"Remove {' and '.join(k for k, _ in clashes)} from the overrides: "
                          f"{'; '.join(why for _, why in clashes)}.")


def configs_for_runs(config_path, overrides: list[str], seeds: list, games: list | None = None,
                     **kwargs) -> list[Config]:
    """One config per (game, seed): the runs that one process trains together."""
    games = games or [None]
    return [build_config(config_path, [*overrides, *([f"env.game={g}"] if g else []), f"seed={s}"], **kwargs)
            for g in games for s in seeds]


def cmd_train(args: argparse.Namespace) -> int:
    from dqn_atari.train import train, train_runs

    overrides, lists = split_run_lists(list(args.overrides))
    if not lists:
        train(build_config(args.config, overrides), progress=not args.no_progress)
        return 0
    refuse_axis_overrides(overrides, "seeds=[...]" if "seeds" in lists else None,
                          "games=[...]" if "games" in lists else None)
    cfgs = configs_for_runs(args.config, overrides, lists.get("seeds") or [build_config(args.config, overrides).seed],
                            lists.get("games"))
    runs = train_runs(cfgs, progress=not args.no_progress)
    return 0 if all(run.is_done for run in runs) else 130


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dqn_atari.evaluate import evaluate_run

    options = dict(o.split("=", 1) for o in args.options if "=" in o)
    unknown = set(options) - {"episodes", "video", "epsilon", "seed"}
    bad = [o for o in args.options if "=" not in o]
    if unknown or bad:
        raise ConfigError(f"evaluate takes episodes=N, epsilon=E, seed=S and video=PATH.mp4; got {sorted(unknown) + bad}.")

    def number(key: str, kind: type, default=None):
        if key not in options:
            return default
        try:
            return kind(options[key])
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"evaluate: {key}={options[key]!r} is not {what}.") from None

    episodes, epsilon, seed = number("episodes", int), number("epsilon", float), number("seed", int, 0)
    if episodes is not None and episodes < 1:
        raise ConfigError(f"evaluate: episodes must be >= 1, got {episodes}.")
    if seed < 0:
        raise ConfigError(f"evaluate: seed must be >= 0, got {seed}.")
    if epsilon is not None and not 0.0 <= epsilon <= 1.0:  # also refuses nan
        raise ConfigError(f"evaluate: epsilon is a probability, in [0, 1]; got {epsilon}.")
    evaluate_run(Path(args.run_dir), episodes=episodes, video=options.get("video"), epsilon=epsilon, seed=seed)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from dqn_atari.train import train

    from dqn_atari.sweep import parse_seeds

    seeds = parse_seeds(args.seeds) if args.seeds.strip() else [1]
    refuse_axis_overrides(args.overrides, "--seeds (make: SEEDS=...)", "--game (make: GAME=...)")
    config_path = find_variant_config(args.variant)
    extra: dict = {"env": {"game": args.game}}
    frames = parse_frames(args.frames)
    if frames:
        extra["train"] = {"frames": frames}
    cfgs = configs_for_runs(config_path, list(args.overrides), seeds, smoke=args.smoke, extra=extra)
    if args.parallel:  # every seed in this one process (dqn_atari.agent_group); the same runs as one by one (README)
        from dqn_atari.train import train_runs

        if not all(run.is_done for run in train_runs(cfgs, progress=not args.no_progress)):
            print("The runs stopped before the end of their budget; re-run the same command to resume.")
            return 130
    for cfg in cfgs if not args.parallel else []:
        run = train(cfg, progress=not args.no_progress)
        if not run.is_done:  # interrupted (a signal): stop here rather than start the next seed
            print(f"Seed {cfg.seed} stopped before the end of its budget; re-run the same command to resume.")
            return 130
    cfg = cfgs[-1]
    from dqn_atari.analysis.report import write_game_report
    from dqn_atari.train import game_of

    runs_root = Path(cfg.runs_root)
    out_dir = runs_root.parent / "reports"
    md, png = write_game_report(cfg.variant, game_of(cfg), runs_root=runs_root,
                                reference_root="results/reference", out_dir=out_dir)
    print(f"Report: {md}\nFigure: {png}")
    return 0


# Commands whose options are parsed by their own modules: dispatched before argparse sees them.
PASSTHROUGH = {
    "tables": ("dqn_atari.analysis.cli", "tables_main", "paper-style tables (Markdown, LaTeX, CSV) from results/runs"),
    "plots": ("dqn_atari.analysis.cli", "plots_main", "learning curves, aggregate and ablation figures"),
    "report": ("dqn_atari.analysis.cli", "report_main", "per-game report of a variant next to the paper's score"),
    "ablations": ("dqn_atari.ablations", "ablations_main", "Rainbow and its six ablations on a game, with the figure"),
    "sweep": ("dqn_atari.sweep", "sweep_main", "games x seeds x variants, locally, on Ray or on Slurm"),
    "status": ("dqn_atari.sweep", "status_main", "one table of a sweep's runs: progress, scores, ETA, state"),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dqn_atari", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run from a config file (resumes if interrupted); seeds=[1,2,3,4] "
                       "(and/or games=[...]) trains several runs in one process",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_keys_help())
    p.add_argument("config", help="YAML config, e.g. configs/nature_dqn.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. env.game=Pong seed=2")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, parser=p)

    p = sub.add_parser("evaluate", help="evaluate a trained run under its protocol; optionally record a video",
                       description="python -m dqn_atari evaluate RUN_DIR [episodes=N] [epsilon=E] [seed=S] [video=PATH.mp4]")
    p.add_argument("run_dir")
    p.add_argument("options", nargs="*", default=[], help="episodes=N, epsilon=E, seed=S, video=PATH.mp4 (colour: one more "
                   "episode, for watching, not one of the scored ones)")
    p.set_defaults(func=cmd_evaluate, parser=p)

    p = sub.add_parser("reproduce", help="train every seed of a variant on a game, then write the game report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_keys_help())
    p.add_argument("--game", default="Breakout")
    p.add_argument("--variant", default="nature_dqn")
    p.add_argument("--seeds", default="1 2 3", help='seeds, e.g. "1 2 3" or 1-5 (default "1 2 3")')
    p.add_argument("--frames", default="", help="training budget in frames (default: the config's)")
    p.add_argument("--smoke", action="store_true", help="tiny budget (configs/smoke.yaml), results under results/smoke/")
    p.add_argument("--parallel", action="store_true",
                   help="train all seeds in one process (batched acting and updates), not one after the other")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    p.set_defaults(func=cmd_reproduce, parser=p)

    for name, (_module, _func, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=f"{text} (see: python -m dqn_atari {name} --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dqn_atari.checkpoint import CheckpointError, is_out_of_memory
    from dqn_atari.train import RunBusy, TrainingDiverged

    argv = sys.argv[1:] if argv is None else list(argv)
    _plain_checkpoint_warnings()
    try:
        if argv and argv[0] in PASSTHROUGH:
            import importlib

            module, func, _text = PASSTHROUGH[argv[0]]
            return getattr(importlib.import_module(module), func)(argv[1:]) or 0
        parser = make_parser()
        # key=value overrides may come before or after options (argparse stops collecting them at an option).
        args, extra = parser.parse_known_args(argv)
        stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if stray:
            getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(stray)}")
        if extra:
            args.overrides = list(args.overrides) + extra
        return args.func(args)
    except (ConfigError, CheckpointError, TrainingDiverged, RunBusy, MemoryError, ValueError, FileNotFoundError) as exc:
        # Exit 2: the input is wrong (fix it and re-run). Exit 1: the run failed (memory, disk, divergence,
        # damaged checkpoint); everything already written is kept.
        print(f"error: {_with_hint(exc)}", file=sys.stderr)
        if isinstance(exc, RunBusy):
            return exc.exit_status
        return 2 if isinstance(exc, (ConfigError, ValueError, FileNotFoundError)) else 1
    except RuntimeError as exc:
        # torch's allocators raise RuntimeErrors (torch.OutOfMemoryError on CUDA), not MemoryError.
        if not is_out_of_memory(exc):
            raise
        print(f"error: out of memory ({str(exc).splitlines()[0]}). Lower train.batch_size or the network's size, "
              f"train fewer runs in one process, or free some memory; the last complete checkpoint is kept, so "
              f"re-running the same command resumes from it.", file=sys.stderr)
        return 1
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: the disk is full ({exc}). Every file already written is intact and the last complete "
                  f"checkpoint is kept: free some space and re-run the same command to resume.", file=sys.stderr)
        else:
            print(f"error: {exc}. Check that the path exists and is writable, then re-run the same command "
                  f"(a run resumes from its last complete checkpoint).", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


def _with_hint(exc: BaseException) -> str:
    """A config value check ("x must be ...") names the problem; add where and how to fix it."""
    text = str(exc)
    if isinstance(exc, ConfigError) and " must " in text and "--help" not in text and not text.startswith("--"):
        text += (" Fix it in the config file or with a key=value override (`python -m dqn_atari train --help` "
                 "lists every key, its default and meaning), then run the command again.")
    return text


def _plain_checkpoint_warnings() -> None:
    """Show a skipped damaged checkpoint as one 'warning: ...' paragraph, not as a source line."""
    import warnings

    from dqn_atari.checkpoint import CheckpointWarning

    default = warnings.formatwarning
    if getattr(default, "_dqn_atari", False):
        return

    def formatwarning(message, category, filename, lineno, line=None):  # noqa: ANN001
        if issubclass(category, CheckpointWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning._dqn_atari = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning
