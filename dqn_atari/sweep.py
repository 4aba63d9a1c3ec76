"""Sweeps: games x seeds x variants as a list of runs, executed locally, on a Ray cluster or on Slurm.

A paper-style result is hundreds of runs of many hours each. We do not schedule them ourselves; we hand
them to an engine (a local process pool, Ray, Slurm via submitit) and make every run safe to re-launch:

- ``sweep`` first writes the run list to ``<results>/sweeps/<name>.json`` (read it, edit it, re-launch
  it with ``--from``), then executes it;
- every run is one ``python -m dqn_atari train CONFIG key=value ...`` subprocess started by
  :func:`run_one`, the one function every backend calls, so a crash of one run cannot take down others;
- a run whose directory holds ``DONE`` is skipped without being touched, and a run with a checkpoint
  resumes from it (the trainer does that), so re-launching the whole sweep after failures, pre-emption
  or a reboot *is* the recovery procedure.

Next to the trainer's files, :func:`run_one` keeps in each run directory:

- ``sweep.log``          the train process's stdout and stderr, one ``=== sweep attempt`` header per start;
- ``sweep_status.json``  running or exited, host, pids, return code; its mtime is the runner's heartbeat;
- ``.sweep.lock``        an ``flock`` held by the runner and inherited by the train process, so two
                         launches never train one run at once (the lock lives until both have exited).

The train process gets SIGTERM when its runner dies (Linux ``PR_SET_PDEATHSIG``): it checkpoints and
exits instead of training on as an orphan. ``status`` reads these files with train.csv, eval.csv and DONE.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dqn_atari.config import parse_frames

try:  # the [slurm] extra; only the slurm backend needs it
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - exercised only without the extra
    _Checkpointable = object  # type: ignore[assignment,misc]

LOG_NAME = "sweep.log"
STATUS_NAME = "sweep_status.json"
LOCK_NAME = ".sweep.lock"
TEST_KILL_MARKER = ".sweep_test_killed"
DONE_NAME = "DONE"  # dqn_atari.rundir.RunDir.DONE (not imported here: runners stay light)
EXIT_BUSY = 75  # train's exit status when another process trains the run: dqn_atari.train.RunBusy.exit_status

HEARTBEAT_S = 30.0
"""The runner touches sweep_status.json this often while its train process lives."""
STALE_S = 4 * HEARTBEAT_S
"""A 'running' status older than this has lost its runner (seen from another host, or a frozen one)."""
LOCK_WAIT_S = 180.0
"""How long a runner waits for a run's lock: a stopped predecessor may still be writing its checkpoint."""
STOP_GRACE_S = 60.0
"""How long a stopped train process may take to checkpoint before it is killed (submitit signals Slurm
jobs 90 s before their time limit)."""
MAX_TIMEOUT_REQUEUES = 30
"""Times a Slurm job may hit its time limit and be requeued (pre-emptions do not count)."""

# Host memory of one run besides its replay: Python, torch, the emulators, networks, optimizer, checkpoint
# buffers. Measured peak RSS on CPU, replay excluded: Pong 0.54 GB, CartPole 0.45 GB; rounded up, with room
# for a CUDA context (about 0.5 GB of host memory) on GPU machines.
PROCESS_BYTES_ATARI = 1_000_000_000
PROCESS_BYTES_CONTROL = 500_000_000
REPLAY_META_BYTES_PER_SLOT = 32  # action, reward, flags, episode step, valid (16 B) + a sum-tree leaf (16 B)

SUITES = {
    # The 57-game table of the Dueling, Prioritized, C51 and Rainbow papers (results/reference, HNS "standard").
    "atari57": "atari_random_human.csv",
    # Mnih et al. 2015, Extended Data Table 2: the Nature paper's 49 games.
    "atari49": "atari_random_human_nature2015.csv",
}


# ----------------------------------------------------------------------------------------------------------
# Run specs and run lists


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: everything a worker needs to start or resume it (JSON in the sweep file)."""

    variant: str
    """The variant's name as its config spells it: the run directory's first level."""
    game: str
    """The game's display name (Pong, CartPole): the run directory's second level."""
    seed: int
    config: str
    """The YAML config file, relative to ``workdir`` or absolute."""
    overrides: tuple[str, ...]
    """``key=value`` arguments for train after the config; they set the game, seed, budget and runs root."""
    run_dir: str
    """Where train writes, ``<runs_root>/<variant>/<game>/seed<seed>``, relative to ``workdir`` or absolute."""
    workdir: str
    """The directory train runs in (the project root; on a cluster, a path every node sees)."""
    frames: int
    """Training budget in frames (for progress and ETA)."""
    memory_bytes: int
    """Estimated host memory of the run: replay frames and metadata plus the process."""
    cpus: int = 1
    """CPU cores of the run: its torch threads (OMP_NUM_THREADS) and what Ray or Slurm reserve."""
    gpus: float = 0.0
    """GPUs Ray or Slurm reserve for the run (Ray accepts fractions, e.g. 0.25: four runs per GPU)."""
    kill_first_attempt: bool = False
    """Tests only: the first attempt SIGKILLs its own runner once the run has a checkpoint."""

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.game}/seed{self.seed}"

    @property
    def path(self) -> Path:
        p = Path(self.run_dir)
        return p if p.is_absolute() else Path(self.workdir) / p

    def command(self, python: str | None = None) -> list[str]:
        return [python or sys.executable, "-m", "dqn_atari", "train", self.config, *self.overrides, "--no-progress"]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = list(self.overrides)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        if isinstance(data, RunSpec):
            return data
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown, missing = sorted(set(data) - names), sorted(required - set(data))
        if unknown or missing:
            raise ValueError(f"A run in the sweep file is malformed: unknown keys {unknown}, missing keys {missing}. "
                             f"Re-create the file with `python -m dqn_atari sweep ... --dry-run`.")
        return cls(**{**data, "overrides": tuple(data["overrides"])})


def words(text: str | Sequence[str] | None) -> list[str]:
    """Items of a list given as "a b", "a,b" or a sequence of such strings."""
    if text is None:
        return []
    parts = [text] if isinstance(text, str) else list(text)
    return [w for part in parts for w in re.split(r"[\s,]+", str(part).strip()) if w]


def parse_seeds(text: str | Sequence[str]) -> list[int]:
    """Seeds as "1 2 3", "1,2,3" or a range "1-5"."""
    seeds: list[int] = []
    for word in words(text):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", word)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"Seeds are non-negative integers or ranges like 1-5; got {word!r}.")
        seeds.extend(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    if not seeds:
        raise ValueError("No seeds given: use e.g. --seeds \"1 2 3\" (make: SEEDS=\"1 2 3\").")
    return list(dict.fromkeys(seeds))


def expand_games(names: Sequence[str], reference_root: str | Path = "results/reference") -> list[str]:
    """Game names, where ``atari57`` / ``atari49`` stand for a whole suite (read from results/reference)."""
    games: list[str] = []
    for word in names:
        if word.lower() in SUITES:
            path = Path(reference_root) / SUITES[word.lower()]
            if not path.is_file():
                raise ValueError(f"The game suite {word} is read from {path}, which is missing; restore it from git.")
            with open(path, newline="") as f:
                games.extend(row["game"] for row in csv.DictReader(f))
        else:
            games.append(word)
    if not games:
        raise ValueError("No games given: use e.g. --games \"Pong Breakout\" (make: GAMES=\"Pong Breakout\"), "
                         "or a suite: atari57, atari49.")
    return games


def _variant_config(variant: str, workdir: Path) -> Path:
    """configs/<variant>.yaml (or configs/ablations/), or a YAML path given directly; relative to workdir."""
    from dqn_atari.config import find_variant_config

    if variant.endswith((".yaml", ".yml")):
        path = Path(variant)
        if not (workdir / path).is_file():
            raise ValueError(f"Config file {variant!r} does not exist (relative to {workdir}).")
        return path
    return find_variant_config(variant, workdir / "configs").relative_to(workdir)


def _check_sweep_overrides(overrides: Sequence[str], frames: int | None, runs_root: str | None) -> None:
    """The sweep's axes (game, seed) and options (frames, runs root) are not also given as overrides."""
    from dqn_atari.config import apply_overrides

    given = apply_overrides({}, list(overrides))  # resolves bare keys ("seed", "game") to their paths
    clashes = []
    if "game" in given.get("env", {}):
        clashes.append("the game (env.game): give games with --games (make: GAMES=...)")
    if "seed" in given:
        clashes.append("the seed: give seeds with --seeds (make: SEEDS=...)")
    if frames is not None and "frames" in given.get("train", {}):
        clashes.append("the budget both as --frames and as train.frames; give one")
    if runs_root is not None and "runs_root" in given:
        clashes.append("the runs root both as --runs-root and as runs_root=; give one")
    if clashes:
        raise ValueError("The overrides set " + "; ".join(clashes) + ".")


def estimate_memory_bytes(cfg: Any) -> int:
    """Host memory a run needs: its replay (allocated and touched up front, see dqn_atari.replay) plus the
    process. Frames are counted once per slot: 1,000,000 x 84x84 uint8 = 7.06 GB (Nature 2015 replay)."""
    from dqn_atari.envs import get_protocol, make_env

    if _is_control(cfg.env.game):
        env = make_env(cfg.env.game, num_envs=1, seed=0, **cfg.env.overrides)
        frame_bytes = math.prod(env.obs_shape[1:]) * env.obs_dtype().itemsize
        process = PROCESS_BYTES_CONTROL
    else:
        side = get_protocol(cfg.env.protocol, **cfg.env.overrides).screen_size  # grayscale uint8 frames
        frame_bytes = side * side
        process = PROCESS_BYTES_ATARI
    frames = 0 if cfg.replay.on_device else cfg.replay.capacity * frame_bytes  # on_device: GPU memory instead
    return int(frames + cfg.replay.capacity * REPLAY_META_BYTES_PER_SLOT + process)


def _is_control(game: str) -> bool:
    return re.sub(r"[^a-z]", "", re.sub(r"-v\d+$", "", game.lower())) in ("cartpole", "maze")


def expand_runs(
    games: Sequence[str],
    seeds: Sequence[int],
    variants: Sequence[str],
    frames: int | None = None,
    overrides: Sequence[str] = (),
    runs_root: str | None = None,
    workdir: str | Path | None = None,
    cpus: int = 1,
    gpus: float = 0.0,
) -> list[RunSpec]:
    """The run list of variants x games x seeds, each config resolved and checked now, so a typo fails the
    sweep before anything starts rather than one run hours later."""
    from dqn_atari.cli import build_config
    from dqn_atari.rundir import RunDir
    from dqn_atari.train import game_of

    workdir = Path(workdir or os.getcwd()).resolve()
    if cpus < 1 or gpus < 0:
        raise ValueError(f"--cpus-per-run must be >= 1 and --gpus-per-run >= 0; got {cpus} and {gpus}.")
    _check_sweep_overrides(overrides, frames, runs_root)
    base = list(overrides)
    base += [f"train.frames={frames}"] if frames is not None else []
    base += [f"runs_root={runs_root}"] if runs_root is not None else []
    # One spelling per game (Pong, not pong or ALE/Pong-v5): it is recorded in each run's config.yaml, and a
    # re-launch spelling it differently must not look like a changed config to the resume check.
    games = list(dict.fromkeys(game_of(build_config(None, [f"env.game={g}"])) for g in games))
    variants = list(dict.fromkeys(variants))
    specs: dict[Path, RunSpec] = {}
    memory_cache: dict[str, int] = {}
    for variant in variants:
        config = _variant_config(variant, workdir)
        for game in games:
            for seed in seeds:
                args = [*base, f"env.game={game}", f"seed={seed}"]
                cfg = build_config(workdir / config, args)
                run_dir = RunDir.for_run(cfg.runs_root, cfg.variant, game, cfg.seed).path
                key = json.dumps([cfg.env.game if _is_control(cfg.env.game) else "atari", cfg.env.protocol,
                                  cfg.env.overrides, cfg.replay.capacity, cfg.replay.on_device], sort_keys=True)
                if key not in memory_cache:
                    memory_cache[key] = estimate_memory_bytes(cfg)
                spec = RunSpec(variant=cfg.variant, game=game, seed=cfg.seed, config=str(config),
                               overrides=tuple(args), run_dir=str(run_dir), workdir=str(workdir),
                               frames=cfg.train.frames, memory_bytes=memory_cache[key], cpus=int(cpus),
                               gpus=float(gpus))
                if spec.path in specs:
                    raise ValueError(f"Two variants of the sweep write to {spec.path}: {specs[spec.path].config} "
                                     f"and {spec.config} both call themselves {cfg.variant!r} in their config. "
                                     f"Give each variant its own name.")
                specs[spec.path] = spec
    return list(specs.values())


def default_name(specs: Sequence[RunSpec]) -> str:
    """A readable sweep name from its axes, e.g. ``nature_dqn+double_dqn_Pong+Breakout_s1-3``."""
    def part(items: list, many: str) -> str:
        return "+".join(map(str, items)) if len(items) <= 3 else f"{len(items)}{many}"

    variants = list(dict.fromkeys(s.variant for s in specs))
    games = list(dict.fromkeys(s.game for s in specs))
    seeds = sorted(set(s.seed for s in specs))
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        seed_part = f"s{seeds[0]}-{seeds[-1]}"
    else:
        seed_part = "s" + part(seeds, "seeds")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{part(variants, 'variants')}_{part(games, 'games')}_{seed_part}")


def sweeps_dir_for(runs_root: str | Path) -> Path:
    """Sweep files live next to the runs: results/runs -> results/sweeps."""
    return Path(runs_root).parent / "sweeps"


def write_sweep_file(path: Path, name: str, specs: Sequence[RunSpec], command: Sequence[str] = (),
                     auto_gpus: bool = False) -> Path:
    """``auto_gpus``: no GPU count was given, so on Ray the runs' GPUs are chosen when it sees the cluster
    (run_ray), also when the file is launched again with ``--from``."""
    data = {"name": name, "written": _now_iso(), "command": shlex.join(command) if command else "",
            "auto_gpus": auto_gpus, "runs": [s.to_dict() for s in specs]}
    _write_json(path, data, indent=1)
    return path


def _refuse_to_replace(path: Path, specs: Sequence[RunSpec]) -> None:
    """A sweep file of the same name that lists other runs (other games, seeds, budget or overrides: the default
    name leaves some out) is another sweep's, which status and --from read: not overwritten."""
    if not path.is_file():
        return
    try:
        _name, before = read_sweep_file(path)
    except ValueError:
        return  # not a sweep file any more: rewritten
    if [(s.run_dir, s.config, s.overrides) for s in before] != [(s.run_dir, s.config, s.overrides) for s in specs]:
        raise ValueError(f"{path} already holds a sweep of other runs (other games, seeds, budget or overrides). "
                         f"Give this one its own name with --name (make: SWEEP_OPTS='--name ...'), re-launch that one "
                         f"with --from {path.stem}, or delete the file if that sweep is no longer wanted.")


def read_sweep_file(path: str | Path) -> tuple[str, list[RunSpec]]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return str(data["name"]), [RunSpec.from_dict(r) for r in data["runs"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"No sweep file {path}; `python -m dqn_atari sweep ...` writes one.") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a sweep file ({exc}); re-create it with `sweep ... --dry-run`.") from None


def find_sweep_file(name: str | None, sweeps_dir: Path) -> Path | None:
    """A sweep file by path or name; without a name, the newest one in ``sweeps_dir`` (None if none)."""
    if name:
        path = Path(name)
        if path.suffix == ".json" and path.is_file():
            return path
        path = sweeps_dir / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in sweeps_dir.glob("*.json")) if sweeps_dir.is_dir() else []
            raise FileNotFoundError(f"No sweep {name!r} in {sweeps_dir}. Known sweeps: {', '.join(known) or 'none'}. "
                                    f"A sweep of another runs root keeps its file next to it: give --runs-root "
                                    f"(make: STATUS_OPTS or SWEEP_OPTS='--runs-root ...') or the file's path, "
                                    f"which the sweep printed.")
        return path
    files = sorted(sweeps_dir.glob("*.json"), key=lambda p: p.stat().st_mtime) if sweeps_dir.is_dir() else []
    return files[-1] if files else None


# ----------------------------------------------------------------------------------------------------------
# Running one run: what every backend's worker calls

_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.RLock()  # re-entrant: submitit's signal handler may run while the main thread holds it
# Set (under _CHILDREN_LOCK) when this process stops its local sweep: runners still waiting for a run's lock then
# start nothing, and the train processes it stopped count as interrupted, however they exit.
_STOPPING = threading.Event()
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int, ignore_usr2: bool) -> Callable[[], None]:
    """Runs in the train process between fork and exec."""
    def setup() -> None:
        if _LIBC is not None:
            # SIGTERM when the runner thread dies (killed worker, SIGKILLed sweep): train checkpoints and
            # exits rather than running on as an orphan next to the run's next attempt.
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
            if os.getppid() != parent_pid:  # the runner died before prctl took effect
                os._exit(143)
        if ignore_usr2:
            # Slurm signals every process of a job with USR2 before its time limit; submitit handles it in
            # the runner (checkpoint() below), which stops train with SIGTERM. USR2 would kill train at once.
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    return setup


def _exited(proc: subprocess.Popen) -> bool:
    """Has the process exited? Does not reap it and takes no lock (safe inside a signal handler)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def stop_children(grace_s: float = STOP_GRACE_S) -> None:
    """Ask every train process this process started to checkpoint and exit; see :func:`stop_processes`."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    stop_processes(children, grace_s)


def stop_processes(children: Sequence[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (train checkpoints and exits), then SIGKILL for those still alive after ``grace_s``.
    Returns when all have exited; safe inside a signal handler."""
    for proc in children:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while not all(_exited(p) for p in children):
        if time.monotonic() > deadline:
            for proc in children:
                _signal(proc, signal.SIGKILL)
            deadline = math.inf
        time.sleep(0.1)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        if not _exited(proc):
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


class _RunLock:
    """Exclusive ``flock`` on the run's lock file; its descriptor is handed to the train process."""

    def __init__(self, path: Path, wait_s: float) -> None:
        self.path, self.wait_s, self.fd = path, wait_s, -1

    def __enter__(self) -> _RunLock | None:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    self.fd = -1
                    return None
                time.sleep(0.5)

    def __exit__(self, *exc: Any) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def _now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    """Replace ``path`` atomically (temp file + rename): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_one(spec: RunSpec | dict) -> dict[str, Any]:
    """Train one run to completion in a subprocess, or skip it if it is DONE; never raises for a failed
    run. Returns ``{"run", "state", "returncode", "error", "log", "seconds"}`` with state one of done,
    skipped (was DONE), failed, interrupted (stopped before the end; re-launch resumes it) or busy
    (another process holds the run)."""
    spec = RunSpec.from_dict(spec)
    path = spec.path
    log = path / LOG_NAME
    result: dict[str, Any] = {"run": spec.name, "state": "skipped", "returncode": None, "error": "",
                              "log": str(log), "seconds": 0.0}
    if (path / DONE_NAME).is_file():
        return _finished(spec, result)
    path.mkdir(parents=True, exist_ok=True)
    with _RunLock(path / LOCK_NAME, LOCK_WAIT_S) as lock:
        if lock is None:
            return {**result, "state": "busy",
                    "error": f"another process holds {path / LOCK_NAME}: the run is being trained elsewhere"}
        if (path / DONE_NAME).is_file():  # finished while we waited for the lock
            return _finished(spec, result)
        return _attempt(spec, lock.fd, result)


def _finished(spec: RunSpec, result: dict[str, Any]) -> dict[str, Any]:
    """A DONE run is skipped if it is this spec's config; one of another config (another FRAMES= or ARGS=) has
    failed this sweep, which must not report its results as its own."""
    other = _other_config_error(spec)
    return {**result, "state": "failed", "error": other} if other else result


def _other_config_error(spec: RunSpec) -> str:
    """finished_with_other_config, with a config that cannot be read here reported as the error."""
    try:
        return finished_with_other_config(spec)
    except ValueError as exc:
        return str(exc)


def finished_with_other_config(spec: RunSpec) -> str:
    """'' when the run directory's recorded config has the spec's run identity (or the spec names no config: the
    runs ``status`` finds without a sweep file); otherwise what differs. Raises ValueError when either config
    cannot be read here (a node that does not see the workdir, say)."""
    import yaml

    if not spec.config:
        return ""

    from dqn_atari.config import ConfigError, config_mismatch, identity_differences, load_config, recorded_identity

    config = Path(spec.config) if Path(spec.config).is_absolute() else Path(spec.workdir) / spec.config
    try:
        ours = load_config(config, spec.overrides).run_identity()
        recorded = yaml.safe_load((spec.path / "config.yaml").read_text())
        if not isinstance(recorded, dict):
            raise ConfigError("it does not hold a mapping")
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot tell whether the finished run in {spec.path} is of this sweep's config: "
                         f"{exc}") from None
    diffs = identity_differences(recorded_identity(recorded), ours)
    return config_mismatch(diffs, spec.path / "config.yaml", done=True) if diffs else ""


def _attempt(spec: RunSpec, lock_fd: int, result: dict[str, Any]) -> dict[str, Any]:
    path, started = spec.path, time.monotonic()
    status_path = path / STATUS_NAME
    attempt = int((_read_json(status_path) or {}).get("attempt", 0)) + 1
    command = spec.command()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # One run per core by default: torch's default of one thread per core in every run oversubscribes the
    # machine (10x slower on CartPole with 2 runs on 2 cores). Ray sets OMP_NUM_THREADS itself.
    env.setdefault("OMP_NUM_THREADS", str(spec.cpus))
    handles_usr2 = signal.getsignal(signal.SIGUSR2) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    status = {"state": "running", "attempt": attempt, "host": socket.gethostname(), "runner_pid": os.getpid(),
              "pid": None, "started": _now_iso(), "command": shlex.join(command)}
    with open(path / LOG_NAME, "ab") as log, _CHILDREN_LOCK:
        if _STOPPING.is_set():  # the sweep was stopped while this runner waited for the run's lock
            return {**result, "state": "interrupted"}
        log.write(f"=== sweep attempt {attempt}: {status['started']} on {status['host']} (runner pid "
                  f"{os.getpid()})\n$ {shlex.join(command)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(command, cwd=spec.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, pass_fds=(lock_fd,), start_new_session=True,
                                    preexec_fn=_child_setup(os.getpid(), handles_usr2))
        except OSError as exc:  # no such workdir or interpreter on this node
            log.write(f"error: cannot start the run: {exc}\n".encode())
            _write_json(status_path, {**status, "state": "exited", "returncode": 127, "ended": _now_iso()})
            return {**result, "state": "failed", "returncode": 127, "error": f"cannot start the run: {exc}"}
        _CHILDREN.add(proc)
    interrupted = False
    try:
        _write_json(status_path, {**status, "pid": proc.pid})
        _wait(proc, spec, status_path)
    except BaseException:  # KeyboardInterrupt, Ray's cancel, submitit's requeue exit: checkpoint, then go
        interrupted = True
        stop_processes([proc])
        raise
    finally:
        rc = proc.wait()
        with _CHILDREN_LOCK:
            _CHILDREN.discard(proc)
            interrupted = interrupted or _STOPPING.is_set()  # stopped by this sweep, whatever its exit status
        _write_json(status_path, {**status, "pid": proc.pid, "state": "exited", "returncode": rc,
                                  "interrupted": interrupted, "ended": _now_iso()})
    done = (path / DONE_NAME).is_file()
    state = ("done" if done else "busy" if rc == EXIT_BUSY else "interrupted" if rc == 0 or interrupted
             else "failed")
    return {**result, "state": state, "returncode": rc, "error": "" if done else last_error(path / LOG_NAME),
            "seconds": round(time.monotonic() - started, 1)}


def _wait(proc: subprocess.Popen, spec: RunSpec, status_path: Path) -> None:
    """Wait for the train process, touching the status file as a heartbeat."""
    beat = time.monotonic()
    while True:
        try:
            proc.wait(timeout=0.2)
            return
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() - beat >= HEARTBEAT_S:
            try:
                os.utime(status_path)
            except OSError:  # deleted by hand: write it again
                _write_json(status_path, {"state": "running", "host": socket.gethostname(),
                                          "runner_pid": os.getpid(), "pid": proc.pid})
            beat = time.monotonic()
        if spec.kill_first_attempt and _has_checkpoint(spec.path):
            marker = spec.path / TEST_KILL_MARKER
            if not marker.exists():
                marker.write_text(_now_iso() + "\n")
                os.kill(os.getpid(), signal.SIGKILL)  # a dying worker, as Ray or a node failure would have it


def _has_checkpoint(path: Path) -> bool:
    return (path / "checkpoints" / "LATEST").is_file()


def last_error(log: Path) -> str:
    """The last error line of the latest attempt in a run's sweep.log ('' if none)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    text = text.rsplit("=== sweep attempt", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines()[2:] if ln.strip()]
    for pattern in (r"^error:", r"^[A-Za-z_.]*(Error|Exception|Interrupt|Exit)\b"):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else ""


class SubmititRun(_Checkpointable):
    """What a Slurm (submitit) job runs: ``run_one(spec)``. Before a time limit or on pre-emption,
    submitit calls ``checkpoint``: train is asked to checkpoint and exit, and the same run is requeued;
    the requeued job resumes it from that checkpoint."""

    def __call__(self, spec: dict) -> dict[str, Any]:
        return run_one(spec)

    def checkpoint(self, spec: dict) -> Any:
        stop_children()
        return super().checkpoint(spec)  # DelayedSubmission(self, spec): the same run again


# ----------------------------------------------------------------------------------------------------------
# Backends


def _print_result(result: dict[str, Any], index: int, total: int, out: Callable[[str], None]) -> None:
    line = f"[{index}/{total}] {result['state']:<11} {result['run']}"
    if result.get("seconds"):
        line += f" ({_duration(result['seconds'])})"
    if result["state"] in ("failed", "busy", "interrupted") and result.get("error"):
        line += f": {result['error']}  [log: {result['log']}]"
    out(line)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def plan_local(specs: Sequence[RunSpec], max_parallel: int | None, memory_budget: int) -> tuple[int, str]:
    """Processes the local pool runs at once and a sentence saying why. Raises ValueError when a run
    cannot fit in memory at all."""
    if not specs:
        return 0, "nothing to run"
    cpus = max(s.cpus for s in specs)
    slots = max_parallel or max(1, _cores() // cpus)
    why = (f"--max-parallel {max_parallel}" if max_parallel else f"{_cores()} cores / {cpus} per run")
    too_big = [s for s in specs if s.memory_bytes > memory_budget]
    if too_big:
        s = too_big[0]
        raise ValueError(
            f"{len(too_big)} run(s) cannot start: {s.name} needs about {_gb(s.memory_bytes)} of memory (replay and "
            f"process) but only {_gb(memory_budget)} is available. Free memory, lower replay.capacity with "
            f"ARGS=\"replay.capacity=...\" (not the paper's setting), or run the sweep on a bigger machine or a "
            f"cluster (BACKEND=ray or slurm).")
    need = max(s.memory_bytes for s in specs)
    by_memory = max(1, memory_budget // need)
    n = min(slots, len(specs))
    if by_memory < n:
        return by_memory, (f"memory allows {by_memory} at a time, not the {n} that {why} would: each run needs up "
                           f"to {_gb(need)} (replay and process) and {_gb(memory_budget)} is available")
    return n, f"{why}; memory holds {by_memory} of the largest ({_gb(need)} each, {_gb(memory_budget)} available)"


def run_local(specs: Sequence[RunSpec], max_parallel: int | None = None, memory_budget: int | None = None,
              out: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """A pool of runners on this machine, each waiting on its train process. A run starts only when its
    memory estimate fits next to the running ones (each replay is allocated in full when its run starts)."""
    from dqn_atari.replay import available_memory_bytes

    if memory_budget is None:
        memory_budget = available_memory_bytes() or 2**62
    slots, why = plan_local(specs, max_parallel, memory_budget)
    out(f"Local backend: up to {slots} run(s) at a time ({why}).")
    todo, results = list(specs), []
    running: dict[Future, RunSpec] = {}
    used = 0
    _STOPPING.clear()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _in_main_thread() else None
    pool = ThreadPoolExecutor(max_workers=max(1, slots), thread_name_prefix="sweep-run")
    try:
        interrupts = 0
        while todo or running:
            try:
                while todo and len(running) < slots and used + todo[0].memory_bytes <= memory_budget:
                    spec = todo.pop(0)
                    used += spec.memory_bytes
                    running[pool.submit(run_one, spec)] = spec
                finished, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                for future in finished:
                    spec = running.pop(future)
                    used -= spec.memory_bytes
                    try:
                        results.append(future.result())
                    except Exception as exc:  # noqa: BLE001 - the runner's own error (a full disk, say): report it
                        results.append(_failure(spec, f"{type(exc).__name__}: {exc}"))
                    _print_result(results[-1], len(results), len(specs), out)
            except KeyboardInterrupt:
                interrupts += 1
                todo.clear()
                with _CHILDREN_LOCK:
                    _STOPPING.set()
                    children = list(_CHILDREN)
                for proc in children:  # in their own sessions: they did not see the terminal's Ctrl-C
                    _signal(proc, signal.SIGTERM if interrupts == 1 else signal.SIGKILL)
                if interrupts == 1:
                    out(f"Stopping: {len(children)} run(s) checkpoint and exit; nothing new starts. Re-launch the "
                        f"same command to resume. Interrupt again to stop them at once.")
                else:
                    raise
    finally:
        pool.shutdown(wait=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if interrupts:
        raise KeyboardInterrupt
    return results


def _failure(spec: RunSpec, error: str) -> dict[str, Any]:
    """The result of a run whose runner or task failed before the run could report for itself."""
    return {"run": spec.name, "state": "failed", "returncode": None, "seconds": 0.0, "error": error,
            "log": str(spec.path / LOG_NAME)}


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_ray(specs: Sequence[RunSpec], max_parallel: int | None = None, retries: int = 3, auto_gpus: bool = False,
            out: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One Ray task per run on the cluster at RAY_ADDRESS (or the one this process already joined, or a
    new local one). A task whose worker dies (node lost, OOM kill) is retried up to ``retries`` times and
    resumes from the run's checkpoint; a run that fails by itself is reported, not retried. ``auto_gpus``:
    each run reserves one GPU if the cluster has any, else none."""
    try:
        import ray
    except ImportError:
        raise ValueError("The ray backend needs Ray: pip install 'dqn_atari[ray]'.") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING")
    try:
        if auto_gpus:
            gpus_each = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            specs = [dataclasses.replace(s, gpus=gpus_each) for s in specs]
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        biggest = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
        gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        for what, need, have in (("memory", max(s.memory_bytes for s in specs), biggest),
                                 ("GPUs", max(s.gpus for s in specs), gpus)):
            if need > have:
                out(f"Warning: a run asks for {need:g} {what} but no live Ray node offers that ({have:g}); its "
                    f"tasks wait until such a node joins (an autoscaler may add one).")
        remote = ray.remote(run_one)
        todo, refs, results = list(specs), {}, []
        out(f"Ray backend: {len(specs)} task(s) on {len(nodes)} node(s), {ray.cluster_resources().get('CPU', 0):g} "
            f"CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; each run reserves {specs[0].cpus} CPU(s), "
            f"{specs[0].gpus:g} GPU(s), {_gb(max(s.memory_bytes for s in specs))} memory.")
        try:
            while todo or refs:
                while todo and (not max_parallel or len(refs) < max_parallel):
                    s = todo.pop(0)
                    ref = remote.options(num_cpus=s.cpus, num_gpus=s.gpus, memory=s.memory_bytes,
                                         max_retries=retries, retry_exceptions=False,
                                         name=f"dqn_atari:{s.name}").remote(s.to_dict())
                    refs[ref] = s
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=5.0)
                for ref in ready:
                    s = refs.pop(ref)
                    try:
                        results.append(ray.get(ref))
                    except ray.exceptions.RayError as exc:  # retries used up, or the task was cancelled
                        results.append(_failure(s, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"))
                    _print_result(results[-1], len(results), len(specs), out)
        except KeyboardInterrupt:
            out("Stopping: cancelling the tasks; their runs checkpoint and exit. Re-launch to resume.")
            for ref in refs:
                ray.cancel(ref)  # raises KeyboardInterrupt in the task: run_one stops train gracefully
            ray.wait(list(refs), num_returns=len(refs), timeout=STOP_GRACE_S + 10)
            raise
        return results
    finally:
        if started:
            ray.shutdown()


def run_slurm(specs: Sequence[RunSpec], folder: Path, max_parallel: int | None = None, time_min: int = 1440,
              partition: str | None = None, cluster: str = "slurm", params: dict[str, Any] | None = None,
              wait_for_results: bool = False, out: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """A submitit job array, one task per run. Before the time limit (and on pre-emption with a signal)
    submitit calls :meth:`SubmititRun.checkpoint`, which has train checkpoint, and requeues the task; it
    resumes from there. ``cluster="local"`` runs the same jobs with submitit's LocalExecutor."""
    try:
        import submitit
    except ImportError:
        raise ValueError("The slurm backend needs submitit: pip install 'dqn_atari[slurm]'.") from None
    if any(not float(s.gpus).is_integer() for s in specs):
        raise ValueError("Slurm gives whole GPUs: use --gpus-per-run 0 or 1 (Ray can share a GPU between runs).")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster,
                                     slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    executor.update_parameters(
        name="dqn_atari", timeout_min=int(time_min), cpus_per_task=max(s.cpus for s in specs),
        gpus_per_node=int(max(s.gpus for s in specs)), tasks_per_node=1, nodes=1,
        mem_gb=math.ceil(max(s.memory_bytes for s in specs) / 1e9 * 1.1),
        **({"slurm_partition": partition} if partition else {}),
        **({"slurm_array_parallelism": int(max_parallel)} if max_parallel else {}),
        **(params or {}))
    jobs = executor.map_array(SubmititRun(), [s.to_dict() for s in specs])
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    out(f"Submitted {len(jobs)} run(s) to {cluster} as job(s) {', '.join(ids)}; logs under {folder}. "
        f"Follow them with `make status`.")
    if not wait_for_results:
        return []
    results = []
    for job, s in zip(jobs, specs):
        try:
            results.append(job.result())
        except Exception as exc:  # noqa: BLE001 - a job that died is reported, the others are still collected
            results.append(_failure(s, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"))
        _print_result(results[-1], len(results), len(specs), out)
    return results


# ----------------------------------------------------------------------------------------------------------
# Status


def _csv_tail(path: Path, max_bytes: int = 32768) -> list[dict[str, str]]:
    """The last complete rows of a CSV, reading only its header and its end (train.csv grows large)."""
    try:
        with open(path, "rb") as f:
            header = f.readline()
            end = f.seek(0, os.SEEK_END)
            start = max(len(header), end - max_bytes)
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    if not header.endswith(b"\n"):
        return []
    lines = data.split(b"\n")[:-1]  # the part after the last newline is unfinished (or empty)
    if start > len(header) and lines:
        lines = lines[1:]  # the first line is cut
    text = (header + b"\n".join(lines) + b"\n").decode(errors="replace")
    return list(csv.DictReader(text.splitlines()))


def _num(row: dict[str, str], key: str) -> float | None:
    try:
        value = float(row.get(key, ""))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def run_status(spec: RunSpec, now: float | None = None, host: str | None = None) -> dict[str, Any]:
    """One row of the status table: state, frames done, last evaluation, frames/s and ETA."""
    now = time.time() if now is None else now
    host = host or socket.gethostname()
    path = spec.path
    row: dict[str, Any] = {"run": spec.name, "state": "pending", "frames": 0, "total": spec.frames, "eval": None,
                           "fps": None, "eta_s": None, "note": "", "run_dir": str(path)}
    if (path / DONE_NAME).is_file():
        try:
            other = finished_with_other_config(spec)
        except ValueError as exc:  # the done row stands, with the doubt in its note
            other, row["note"] = "", str(exc)
        if other:
            return {**row, "state": "failed", "note": other}
        summary = _read_json(path / DONE_NAME) or {}
        frames, wall = summary.get("frames", spec.frames), summary.get("wall_time_s")
        return {**row, "state": "done", "frames": frames, "eval": summary.get("final_eval_mean"),
                "fps": frames / wall if wall else None}
    train, evals = _csv_tail(path / "train.csv"), _csv_tail(path / "eval.csv", 4096)
    if train:
        last = train[-1]
        row["frames"] = int(_num(last, "frames") or 0)
        row["fps"] = _recent_rate(train)
    if evals:
        row["eval"] = _num(evals[-1], "mean_score")
        row["frames"] = max(row["frames"], int(_num(evals[-1], "frames") or 0))
    status = _read_json(path / STATUS_NAME)
    if status is None:
        started = train or evals or _has_checkpoint(path)
        row["state"] = "interrupted" if started else "pending"
        row["note"] = "started outside this sweep; re-launch resumes it" if started else ""
    elif status.get("state") == "running":
        age = now - (path / STATUS_NAME).stat().st_mtime
        same_host = status.get("host") == host
        alive = age < STALE_S and (not same_host or _pid_alive(status.get("runner_pid")))
        row["state"] = "running" if alive else "interrupted"
        row["note"] = (f"attempt {status.get('attempt')} on {status.get('host')}" if alive else
                       f"its runner on {status.get('host')} is gone; re-launch resumes it")
    else:
        rc = status.get("returncode")
        if rc == EXIT_BUSY:
            row["state"] = "busy"
            row["note"] = "another process (a `make reproduce`?) was training it when this sweep tried"
        elif rc not in (0, None) and not status.get("interrupted"):
            row["state"] = "failed"
            row["note"] = (f"killed by {_signal_name(-rc)}" if rc < 0 else f"exit {rc}") + ": " + \
                (last_error(path / LOG_NAME) or "see the log") + f"  [log: {path / LOG_NAME}]"
        else:
            row["state"] = "interrupted"
            row["note"] = "stopped before the end; re-launch resumes it"
    if row["state"] == "running" and row["fps"]:
        row["eta_s"] = max(0.0, (spec.frames - row["frames"]) / row["fps"])
    return row


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _recent_rate(rows: list[dict[str, str]], window_s: float = 600.0) -> float | None:
    """Frames per second over the last ``window_s`` of training time (whole run if shorter)."""
    pts = [(w, f) for w, f in ((_num(r, "wall_time"), _num(r, "frames")) for r in rows) if w is not None and f]
    if not pts:
        return None
    w1, f1 = pts[-1]
    recent = [(w, f) for w, f in pts if w >= w1 - window_s]
    w0, f0 = recent[0]
    if w1 - w0 >= 5.0 and f1 > f0:
        return (f1 - f0) / (w1 - w0)
    return f1 / w1 if w1 > 0 else None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _frames(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


def format_status(rows: Sequence[dict[str, Any]]) -> str:
    """The status table and a summary line."""
    header = ("run", "state", "frames", "eval", "frames/s", "ETA", "note")
    table = [header]
    for r in rows:
        pct = f" ({100 * r['frames'] / r['total']:.0f}%)" if r["total"] else ""
        table.append((r["run"], r["state"], f"{_frames(r['frames'])}/{_frames(r['total'])}{pct}",
                      "-" if r["eval"] is None else f"{r['eval']:.1f}",
                      "-" if not r["fps"] else f"{r['fps']:,.0f}", _duration(r["eta_s"]), r["note"]))
    widths = [max(len(str(t[i])) for t in table) for i in range(len(header) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(t, widths)) + "  " + t[-1] for t in table]
    lines = [ln.rstrip() for ln in lines]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    order = ("done", "running", "busy", "pending", "interrupted", "failed")
    summary = f"{len(rows)} runs: " + ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
    rate = sum(r["fps"] or 0 for r in rows if r["state"] == "running")
    left = sum(max(0, r["total"] - r["frames"]) for r in rows if r["state"] in ("running", "pending", "interrupted"))
    if rate and left:
        summary += (f". {_frames(left)} frames to go at {rate:,.0f} frames/s (the running runs together; failed "
                    f"and busy runs not counted): about {_duration(left / rate)} if nothing else changes")
    return "\n".join(lines + ["", summary + "."])


# ----------------------------------------------------------------------------------------------------------
# Command lines


def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dqn_atari sweep",
        description="Run every variant x game x seed, locally, on Ray or on Slurm. Re-launching the same "
                    "command skips finished runs and resumes the others from their checkpoints.")
    p.add_argument("--games", default="", help='games, e.g. "Pong Breakout"; atari57 / atari49 for a whole suite')
    p.add_argument("--seeds", default="1 2 3", help='seeds, e.g. "1 2 3" or 1-5 (default: 1 2 3)')
    p.add_argument("--variants", default="nature_dqn", help="config names in configs/ (or YAML paths)")
    p.add_argument("--frames", default="", help="training budget in frames, e.g. 10M (default: the config's)")
    p.add_argument("--backend", default="local", choices=("local", "ray", "slurm"))
    p.add_argument("--name", default="", help="sweep name (default: from variants, games and seeds)")
    p.add_argument("--from", dest="from_file", default="", help="re-launch the run list of a sweep file or name")
    p.add_argument("--max-parallel", default="", help="most runs at once (local pool size, Ray tasks in "
                                                      "flight, Slurm array parallelism)")
    p.add_argument("--runs-root", default="", help="where run directories go (default: results/runs)")
    p.add_argument("--cpus-per-run", type=int, default=None, help="CPU cores (and torch threads) per run (1)")
    p.add_argument("--gpus-per-run", type=float, default=None,
                   help="GPUs per run for Ray (fractions share a GPU) and Slurm (default: ray 1 if the cluster "
                        "has GPUs else 0; slurm 1; local: not used, runs share the machine's devices)")
    p.add_argument("--memory-gb", type=float, default=None, help="local: memory the runs may use "
                                                                  "(default: MemAvailable)")
    p.add_argument("--retries", type=int, default=3, help="ray: retries of a run whose worker died (3)")
    p.add_argument("--time-min", type=int, default=1440, help="slurm: time limit of a job in minutes; a run "
                                                              "that needs longer is requeued and resumes (1440)")
    p.add_argument("--partition", default="", help="slurm partition")
    p.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra submitit parameter, e.g. slurm_account=abc or slurm_constraint=a100 (repeatable)")
    p.add_argument("--submitit-cluster", default="slurm", choices=("slurm", "local"),
                   help="slurm backend: 'local' runs the same jobs with submitit's LocalExecutor (testing)")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and report their results")
    p.add_argument("--dry-run", action="store_true", help="write and print the run list; run nothing")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run (after --)")
    return p


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    params = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--slurm-param takes KEY=VALUE (e.g. slurm_account=abc), got {item!r}.")
        key, value = item.split("=", 1)
        params[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return params


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``python -m dqn_atari sweep``: expand, write the run list, execute it. 0 when every run is done."""
    args = _sweep_parser().parse_args(argv)
    try:
        return _sweep(args, list(argv) if argv is not None else sys.argv[1:])
    except (ValueError, FileNotFoundError, MemoryError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted; re-launch the same command to resume.", file=sys.stderr)
        return 130


def _sweep(args: argparse.Namespace, argv: list[str]) -> int:
    text = str(args.max_parallel).strip()
    if text and not (text.isdigit() and int(text) >= 1):
        raise ValueError(f"--max-parallel (make: MAX_PARALLEL) must be a whole number >= 1, got {text!r}.")
    max_parallel = int(text) if text else None
    runs_root = args.runs_root.strip() or None
    if args.from_file:
        sweeps_dir = sweeps_dir_for(runs_root or "results/runs")
        path = find_sweep_file(args.from_file, sweeps_dir)
        name, specs = read_sweep_file(path)
        auto_gpus = args.gpus_per_run is None and bool((_read_json(path) or {}).get("auto_gpus"))
        gpus = args.gpus_per_run
        if gpus is None and auto_gpus and args.backend == "slurm" and args.submitit_cluster == "slurm":
            gpus = 1.0  # Slurm's default, as for a sweep expanded for it (the file may come from a local dry run)
        resources = {k: v for k, v in (("cpus", args.cpus_per_run), ("gpus", gpus)) if v is not None}
        specs = [dataclasses.replace(s, **resources) for s in specs]
        # What would change the runs is refused rather than dropped (make passes its GAMES, SEEDS and VARIANTS
        # defaults every time, so those are not checked).
        ignored = [flag for flag, given in (("--frames (make: FRAMES)", args.frames.strip()),
                                            ("overrides (make: ARGS)", args.overrides)) if given]
        if ignored:
            raise ValueError(f"--from re-launches the run list of {path} as it is: {' and '.join(ignored)} would be "
                             f"ignored. Drop them, or start a new sweep (without --from) with them.")
    else:
        games = expand_games(words(args.games))
        variants = words(args.variants)
        if not variants:
            raise ValueError('No variants given: use e.g. --variants "nature_dqn double_dqn".')
        # Slurm runs get a whole GPU unless told otherwise; Ray decides once it sees the cluster (run_ray).
        default_gpus = 1.0 if args.backend == "slurm" and args.submitit_cluster == "slurm" else 0.0
        gpus = args.gpus_per_run if args.gpus_per_run is not None else default_gpus
        auto_gpus = args.gpus_per_run is None
        specs = expand_runs(games, parse_seeds(args.seeds), variants, frames=parse_frames(args.frames),
                            overrides=args.overrides, runs_root=runs_root,
                            cpus=1 if args.cpus_per_run is None else args.cpus_per_run, gpus=gpus)
        name = args.name.strip() or default_name(specs)
        root = Path(specs[0].run_dir).parents[2]  # <runs_root>/<variant>/<game>/seed<k>
        path = sweeps_dir_for(root if root.is_absolute() else Path(specs[0].workdir) / root) / f"{name}.json"
        _refuse_to_replace(path, specs)
    todo = [s for s in specs if not (s.path / DONE_NAME).is_file()]
    others = {s.name: why for s in specs if s not in todo and (why := _other_config_error(s))}
    if not args.from_file and not others:  # a refused sweep leaves the file of the one before it as it was
        write_sweep_file(path, name, specs, ["python", "-m", "dqn_atari", "sweep", *argv], auto_gpus=auto_gpus)
    print(f"Sweep {name}: {len(specs)} runs, {len(specs) - len(todo)} already done, {len(todo)} to run. "
          f"Run list: {path}{' (not written)' if others and not args.from_file else ''}")
    if others:
        for run, why in others.items():
            print(f"  {run}: {why}", file=sys.stderr)
        print(f"error: {len(others)} of these run directories hold a finished run of another config (listed above); "
              f"this sweep would report their results as its own. Nothing was started: use another --runs-root "
              f"(make: SWEEP_OPTS='--runs-root ...') or move those runs away.", file=sys.stderr)
        return 2
    if args.dry_run:
        for s in specs:
            print(f"  {s.name:<40} {s.run_dir}  (~{_gb(s.memory_bytes)})  {shlex.join(s.command('python'))}")
        return 0
    if not todo:
        print("Nothing to do: every run is DONE. `make tables` and `make plots` summarise the results.")
        return 0
    if args.backend == "local":
        results = run_local(todo, max_parallel, int(args.memory_gb * 1e9) if args.memory_gb is not None else None)
    elif args.backend == "ray":
        results = run_ray(todo, max_parallel, retries=args.retries,
                          auto_gpus=auto_gpus)  # not given now, nor when the sweep file was written
    else:
        folder = path.with_name(f"{name}_submitit")
        results = run_slurm(todo, folder, max_parallel, args.time_min, args.partition or None,
                            cluster=args.submitit_cluster, params=_parse_params(args.slurm_param),
                            wait_for_results=args.wait)
        if not args.wait:
            return 0
    return _report(results, name)


def _report(results: Sequence[dict[str, Any]], name: str) -> int:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(f"Sweep {name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".")
    bad = [r for r in results if r["state"] not in ("done", "skipped")]
    for r in bad:
        print(f"  {r['state']}: {r['run']}: {r.get('error') or 'no error line'}  [log: {r['log']}]")
    if bad:
        print("Re-launch the same command to retry them: finished runs are skipped, the others resume.")
        return 1
    print("All runs DONE. Next: `make tables` and `make plots`.")
    return 0


def _status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dqn_atari status",
                                description="One table for a sweep: per run its state, frames done, last "
                                            "evaluation score, frames/s and ETA.")
    p.add_argument("--name", default="", help="sweep name or file (default: the newest in results/sweeps)")
    p.add_argument("--runs-root", default="results/runs", help="runs root; its sweeps/ sibling holds the sweeps")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    return p


def status_main(argv: Sequence[str] | None = None) -> int:
    """``python -m dqn_atari status``: the table of a sweep (or of every run under the runs root)."""
    args = _status_parser().parse_args(argv)
    runs_root = Path(args.runs_root or "results/runs")
    try:
        path = find_sweep_file(args.name.strip() or None, sweeps_dir_for(runs_root))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if path is not None:
        title, specs = read_sweep_file(path)
        title = f"Sweep {title} ({path})"
    else:
        specs = _specs_on_disk(runs_root)
        title = f"No sweep file in {sweeps_dir_for(runs_root)}; every run under {runs_root}"
    rows = [run_status(s) for s in specs]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(title + "\n" + (format_status(rows) if rows else "no runs yet."))
    return 0


def _specs_on_disk(runs_root: Path) -> list[RunSpec]:
    """Minimal specs for the run directories found under ``runs_root`` (for status without a sweep file)."""
    import yaml

    specs = []
    for path in sorted(runs_root.glob("*/*/seed*")):
        try:
            cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
            frames = int(cfg.get("train", {}).get("frames", 0))
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            frames = 0
        seed = int(path.name[4:]) if path.name[4:].isdigit() else 0
        specs.append(RunSpec(variant=path.parent.parent.name, game=path.parent.name, seed=seed, config="",
                             overrides=(), run_dir=str(path.resolve()), workdir=os.getcwd(), frames=frames,
                             memory_bytes=0))
    return specs

