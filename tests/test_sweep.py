"""Sweeps: run lists, the local pool, Ray and submitit backends, idempotent re-launch and recovery, status.

Every backend test trains real (tiny) CartPole / Maze runs in real subprocesses: killing the sweep, killing
a Ray worker or pre-empting a submitit job must leave runs that a re-launch completes without redoing any.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dqn_atari.sweep import (
    DONE_NAME, EXIT_BUSY, LOCK_NAME, LOG_NAME, STATUS_NAME, TEST_KILL_MARKER, RunSpec, _csv_tail, _recent_rate,
    estimate_memory_bytes, expand_runs, parse_frames, parse_seeds, plan_local, read_sweep_file, run_one, run_status,
    format_status, status_main, sweep_main, write_sweep_file,
)

ROOT = Path(__file__).resolve().parent.parent
# A few seconds of training per run; a checkpoint every 500 steps so interrupted runs have one to resume from.
TINY = ["network.torso=mlp", "train.frames=2000", "replay.capacity=5000", "train.replay_start_steps=200",
        "eval.period_steps=1000", "eval.episodes=2", "eval.num_envs=1", "eval.max_steps=2000",
        "train.checkpoint_period_steps=500"]
TIMEOUT_S = 400  # generous: a safety net for a hung test on a loaded machine, not a speed check


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/ is found relative to the working directory, as for `make`


def tiny_specs(tmp_path: Path, games=("CartPole", "Maze"), seeds=(1, 2)) -> list[RunSpec]:
    return expand_runs(list(games), list(seeds), ["nature_dqn"], overrides=TINY, runs_root=str(tmp_path / "runs"))


def longer(spec: RunSpec, frames: int = 6000) -> RunSpec:
    """The same run with a longer budget, so there is time to interrupt it after its first checkpoint."""
    return dataclasses.replace(spec, overrides=(*spec.overrides, f"train.frames={frames}"), frames=frames)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def wait_until(condition, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout_s} s")
        time.sleep(0.1)


def assert_completed_once(spec: RunSpec) -> None:
    """DONE, the whole budget trained, and no step logged twice (two trainers never shared the run)."""
    import pandas as pd

    assert (spec.path / DONE_NAME).is_file(), f"{spec.name} is not DONE; log:\n{(spec.path / LOG_NAME).read_text()}"
    train = pd.read_csv(spec.path / "train.csv")
    assert train["agent_step"].is_monotonic_increasing and train["agent_step"].is_unique
    assert json.loads((spec.path / DONE_NAME).read_text())["frames"] == spec.frames


def describe(specs: list[RunSpec], *extra_logs: Path) -> str:
    """Every run's status and sweep.log, for assertion messages."""
    parts = [f"--- {p}\n{p.read_text()}" for p in extra_logs if p.is_file()]
    for s in specs:
        log, status = s.path / LOG_NAME, s.path / STATUS_NAME
        parts.append(f"--- {s.name}: {run_status(s)}\n{status.read_text() if status.is_file() else 'no status'}\n"
                     f"{log.read_text() if log.is_file() else 'no log'}")
    return "\n".join(parts)


def unlocked(spec: RunSpec) -> bool:
    """No runner or train process holds the run's lock (all have exited)."""
    import fcntl

    if not (spec.path / LOCK_NAME).is_file():
        return True
    with open(spec.path / LOCK_NAME) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def attempts(spec: RunSpec) -> list[str]:
    """The sweep.log text of each attempt."""
    return (spec.path / LOG_NAME).read_text().split("=== sweep attempt")[1:]


# ---------------------------------------------------------------------------------------------------- fast


def test_expansion_resolves_every_run_and_round_trips_through_the_sweep_file(tmp_path):
    specs = tiny_specs(tmp_path)
    assert [s.name for s in specs] == ["nature_dqn/CartPole/seed1", "nature_dqn/CartPole/seed2",
                                       "nature_dqn/Maze/seed1", "nature_dqn/Maze/seed2"]
    for s in specs:
        assert s.path == tmp_path / "runs" / "nature_dqn" / s.game / f"seed{s.seed}"
        assert s.frames == 2000 and f"seed={s.seed}" in s.overrides and f"env.game={s.game}" in s.overrides
        assert s.command()[1:5] == ["-m", "dqn_atari", "train", "configs/nature_dqn.yaml"]
    # Spellings of one game are one run, recorded under one name (a resume compares recorded configs).
    assert tiny_specs(tmp_path, games=("cartpole", "CartPole", "maze"), seeds=(1,)) == specs[::2]
    path = write_sweep_file(tmp_path / "sweeps" / "x.json", "x", specs)
    assert read_sweep_file(path) == ("x", specs)
    # `sweep` writes the run list next to the runs, and --dry-run starts nothing.
    assert sweep_main(["--games", "CartPole Maze", "--seeds", "1-2", "--runs-root", str(tmp_path / "runs"),
                       "--name", "dry", "--dry-run", "--", *TINY]) == 0
    assert read_sweep_file(tmp_path / "sweeps" / "dry.json")[1] == specs
    assert not (tmp_path / "runs").exists()
    # No --gpus-per-run: Ray chooses the runs' GPUs once it sees the cluster, on a re-launch with --from too.
    assert json.loads((tmp_path / "sweeps" / "dry.json").read_text())["auto_gpus"] is True
    assert sweep_main(["--games", "CartPole", "--seeds", "1", "--runs-root", str(tmp_path / "runs"), "--name", "cpu",
                       "--gpus-per-run", "0", "--dry-run", "--", *TINY]) == 0
    assert json.loads((tmp_path / "sweeps" / "cpu.json").read_text())["auto_gpus"] is False


def test_replay_memory_estimate_matches_the_paper_replay():
    from dqn_atari.cli import build_config

    cfg = build_config(ROOT / "configs" / "nature_dqn.yaml", ["env.game=Pong"])
    # Nature 2015, Ext. Data Table 1: 1,000,000 transitions; one 84x84 uint8 frame each = 7.056 GB.
    assert estimate_memory_bytes(cfg) == 1_000_000 * (84 * 84 + 32) + 1_000_000_000
    small = build_config(ROOT / "configs" / "nature_dqn.yaml", ["env.game=CartPole", "replay.capacity=1000"])
    assert estimate_memory_bytes(small) == 1000 * (4 * 4 + 32) + 500_000_000  # 4 float32 observations


@pytest.mark.parametrize("argv, message", [
    (["--games", "Pongg"], "Unknown Atari game 'Pongg'"),
    (["--games", "Pong", "--variants", "nature_dqm"], "Did you mean nature_dqn"),
    (["--games", "Pong", "--", "seed=3"], "give seeds with --seeds"),
    (["--games", "Pong", "--", "game=Breakout"], "give games with --games"),
    (["--games", "Pong", "--", "agent.lrr=0.1"], "agent.lr"),
    (["--games", "Pong", "--seeds", "3-1"], "ranges like 1-5"),
    (["--games", "Pong", "--frames", "ten"], "--frames must be"),
    (["--games", "Pong", "--memory-gb", "2"], "needs about 8.1 GB"),
])
def test_bad_sweeps_fail_before_anything_starts_with_a_helpful_message(tmp_path, capsys, argv, message):
    assert sweep_main(["--runs-root", str(tmp_path / "runs"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_seed_and_frame_syntax():
    assert parse_seeds("1 2,3 5-7") == [1, 2, 3, 5, 6, 7]
    assert parse_frames("10M") == 10_000_000 and parse_frames("1e7") == 10_000_000 and parse_frames("") is None


def test_local_pool_is_limited_by_memory_and_says_why():
    spec = RunSpec("v", "Pong", 1, "c.yaml", (), "r", "/", 50_000_000, memory_bytes=8_000_000_000)
    n, why = plan_local([spec] * 8, max_parallel=8, memory_budget=20_000_000_000)
    assert n == 2 and "memory allows 2" in why and "8.0 GB" in why
    n, why = plan_local([spec] * 8, max_parallel=3, memory_budget=100_000_000_000)
    assert n == 3 and "--max-parallel 3" in why


def test_csv_tail_reads_the_last_complete_rows_of_a_long_file(tmp_path):
    path = tmp_path / "train.csv"
    # One row per second of wall time: 20 frames/s, then 40 frames/s over the last 1,000 s.
    frames = [20 * i if i <= 19_000 else 380_000 + 40 * (i - 19_000) for i in range(20_001)]
    rows = "".join(f"{i},{frames[i]},{float(i)}\n" for i in range(1, 20_001))
    path.write_text("agent_step,frames,wall_time\n" + rows + "20001,420040,2000")  # a crash left half a line
    tail = _csv_tail(path)
    assert tail[-1] == {"agent_step": "20000", "frames": "420000", "wall_time": "20000.0"}
    first = int(tail[0]["agent_step"])
    assert 1 < first < 20_000 - 600, "the tail is the file's end only, and longer than the rate's window"
    assert [int(r["agent_step"]) for r in tail] == list(range(first, 20_001))
    # The rate of the last 600 s, not the whole run's 21 frames/s.
    assert _recent_rate(tail) == pytest.approx(40.0)


def test_status_tells_pending_running_interrupted_and_failed_apart(tmp_path):
    specs = tiny_specs(tmp_path, games=("CartPole",), seeds=(1, 2, 3, 4, 5))
    pending, running, orphaned, failed, elsewhere = specs
    dead = subprocess.Popen(["true"])
    dead.wait()
    for spec, status in ((running, {"state": "running", "runner_pid": os.getpid()}),
                         (orphaned, {"state": "running", "runner_pid": dead.pid}),
                         (failed, {"state": "exited", "returncode": 2, "interrupted": False}),
                         (elsewhere, {"state": "running", "host": "node-17", "runner_pid": 1})):
        spec.path.mkdir(parents=True)
        (spec.path / STATUS_NAME).write_text(json.dumps({"host": socket.gethostname(), "attempt": 1, **status}))
    (running.path / "train.csv").write_text("agent_step,frames,episode,score,length,epsilon,wall_time\n"
                                            "100,100,1,20.0,100,1.0,1.0\n1100,1100,2,30.0,1000,0.9,11.0\n")
    (failed.path / LOG_NAME).write_text("=== sweep attempt 1: ...\n$ python -m dqn_atari train ...\nTraceback:\n"
                                        "error: capacity 10 gives 10 slots per env; Raise replay.capacity.\n")
    stale = time.time() - 1000
    os.utime(elsewhere.path / STATUS_NAME, (stale, stale))
    rows = {r["run"]: r for r in (run_status(s, host=socket.gethostname()) for s in specs)}
    assert rows[pending.name]["state"] == "pending"
    r = rows[running.name]
    assert r["state"] == "running" and r["frames"] == 1100 and r["fps"] == pytest.approx(100.0)
    assert r["eta_s"] == pytest.approx((2000 - 1100) / 100.0)
    assert rows[orphaned.name]["state"] == "interrupted"
    assert rows[failed.name]["state"] == "failed" and "Raise replay.capacity" in rows[failed.name]["note"]
    assert rows[elsewhere.name]["state"] == "interrupted"  # another host's heartbeat went stale
    # Busy runs are counted; the ETA counts the frames of runs that will go on, not of failed or busy ones.
    (pending.path).mkdir(parents=True)
    (pending.path / STATUS_NAME).write_text(json.dumps({"state": "exited", "returncode": EXIT_BUSY}))
    rows[pending.name] = run_status(pending)
    summary = format_status(list(rows.values())).splitlines()[-1]
    assert summary.startswith("5 runs: 1 running, 1 busy, 2 interrupted, 1 failed.")
    assert "4.9k frames to go" in summary  # running 900 + two interrupted 2,000 each (failed and busy not counted)


def test_status_without_a_sweep_file_reads_the_runs_on_disk(tmp_path, capsys):
    """No sweep file: every run directory under the runs root, finished ones shown done without a doubt."""
    run = tmp_path / "runs" / "nature_dqn" / "CartPole" / "seed1"
    run.mkdir(parents=True)
    (run / DONE_NAME).write_text(json.dumps({"frames": 2000, "final_eval_mean": 9.5, "wall_time_s": 4.0}))
    assert status_main(["--runs-root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "nature_dqn/CartPole/seed1" in out and "done" in out and "cannot tell" not in out


# ---------------------------------------------------------------------------------------------------- local


@pytest.mark.slow
def test_local_sweep_killed_midway_is_completed_by_relaunch_without_redoing_work(tmp_path, capsys):
    """SIGKILL the whole sweep after its first run finishes; re-launching completes the rest, skips the
    finished runs without touching their files, and a third launch does nothing at all."""
    argv = ["--games", "CartPole Maze", "--seeds", "1 2", "--runs-root", str(tmp_path / "runs"), "--name", "t",
            "--max-parallel", "2", "--", *TINY]
    specs = tiny_specs(tmp_path)
    with open(tmp_path / "first.log", "wb") as out:
        first = subprocess.Popen([sys.executable, "-c", "import sys; from dqn_atari.sweep import sweep_main; "
                                  "sys.exit(sweep_main(sys.argv[1:]))", *argv],
                                 cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen_running = set()

    def one_done() -> bool:
        seen_running.update(s.name for s in specs if (s.path / STATUS_NAME).is_file()
                            and run_status(s)["state"] == "running")
        return any((s.path / DONE_NAME).is_file() for s in specs) or first.poll() is not None

    wait_until(one_done, "the first run to finish")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert seen_running, "status never showed a run as running while the sweep trained"
    # Orphaned train processes get SIGTERM when their runner dies: they checkpoint (or finish) and exit.
    wait_until(lambda: all(unlocked(s) for s in specs), "the orphaned train processes to exit")
    done_before = [s for s in specs if (s.path / DONE_NAME).is_file()]
    assert 0 < len(done_before) < len(specs), describe(specs, tmp_path / "first.log")
    for s in specs:  # the sweep is dead: nothing may look like it is still running, nothing failed
        assert run_status(s)["state"] in ("done", "interrupted", "pending"), describe(specs, tmp_path / "first.log")
    before = {s.name: snapshot(s.path) for s in done_before}

    assert sweep_main(argv) == 0, describe(specs, tmp_path / "first.log")
    out = capsys.readouterr().out
    assert f"{len(done_before)} already done, {len(specs) - len(done_before)} to run" in out
    for s in specs:
        assert_completed_once(s)
    for s in done_before:
        assert snapshot(s.path) == before[s.name], f"{s.name} was DONE but the re-launch touched it"

    everything = snapshot(tmp_path / "runs")
    assert sweep_main(argv) == 0
    assert "4 already done, 0 to run" in capsys.readouterr().out
    assert snapshot(tmp_path / "runs") == everything

    assert status_main(["--runs-root", str(tmp_path / "runs"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in rows] == ["done"] * 4 and all(r["frames"] == 2000 for r in rows)
    for r, s in zip(rows, specs):
        assert r["eval"] == json.loads((s.path / DONE_NAME).read_text())["final_eval_mean"]


def test_a_failing_run_is_reported_with_its_error_and_shown_failed_by_status(tmp_path, capsys):
    argv = ["--games", "CartPole", "--seeds", "1", "--runs-root", str(tmp_path / "runs"), "--name", "bad", "--",
            *TINY, "replay.capacity=4"]  # passes the config checks; the replay refuses it when the run starts
    assert sweep_main(argv) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "replay.capacity" in out and LOG_NAME in out
    assert status_main(["--runs-root", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "failed" in table and "exit 2" in table and "replay.capacity" in table


def test_a_finished_run_of_another_config_is_refused_not_counted_as_done(tmp_path, capsys):
    """A sweep with another budget over a runs root that holds a finished run stops before starting anything
    (it would report that run's results as its own); status and the runner say so too; the run is untouched."""
    argv = ["--games", "CartPole", "--seeds", "1", "--runs-root", str(tmp_path / "runs"), "--name", "a", "--", *TINY]
    assert sweep_main(argv) == 0
    spec = tiny_specs(tmp_path, games=("CartPole",), seeds=(1,))[0]
    before = snapshot(spec.path)
    capsys.readouterr()
    sweep_file = tmp_path / "sweeps" / "a.json"
    recorded = sweep_file.read_text()
    assert sweep_main([*argv, "train.frames=3000"]) == 2  # the same name: it would replace sweep a's run list
    assert "already holds a sweep of other runs" in capsys.readouterr().err and sweep_file.read_text() == recorded
    assert sweep_main([*[a if a != "a" else "b" for a in argv], "train.frames=3000"]) == 2
    err = capsys.readouterr().err
    assert "finished run of a different config" in err and "train.frames: recorded 2000, now 3000" in err
    assert "Nothing was started" in err and not (tmp_path / "sweeps" / "b.json").exists()
    assert sweep_main(["--from", "a", "--runs-root", str(tmp_path / "runs"), "--", "train.frames=3000"]) == 2
    assert "would be ignored" in capsys.readouterr().err  # --from re-launches a run list as it is
    other = longer(spec, 3000)
    assert run_status(other)["state"] == "failed" and "train.frames" in run_status(other)["note"]
    assert run_one(other)["state"] == "failed"
    assert run_status(spec)["state"] == "done" and run_one(spec)["state"] == "skipped"
    assert snapshot(spec.path) == before
    # Another spelling of the same game (as `make reproduce GAME=cartpole` records it) is the same run.
    config = spec.path / "config.yaml"
    config.write_text(config.read_text().replace("game: CartPole", "game: cartpole"))
    assert run_status(spec)["state"] == "done" and run_one(spec)["state"] == "skipped"


def test_a_stopping_sweep_starts_nothing_and_a_busy_run_is_shown_busy(tmp_path):
    """Once a local sweep is stopping, a runner that got its run's lock only then starts no train process;
    a run whose train finds another trainer at work (exit 75, EX_TEMPFAIL) is busy, not failed."""
    import dqn_atari.sweep as sweep

    spec, busy = tiny_specs(tmp_path, games=("CartPole",), seeds=(1, 2))
    sweep._STOPPING.set()
    try:
        assert run_one(spec)["state"] == "interrupted"
    finally:
        sweep._STOPPING.clear()
    assert (spec.path / LOG_NAME).read_text() == "" and not (spec.path / "config.yaml").exists()
    import fcntl

    from dqn_atari.train import TRAIN_LOCK

    busy.path.mkdir(parents=True)
    with open(busy.path / TRAIN_LOCK, "w") as held:  # as a `make reproduce` of the same run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_one(busy)
    assert result["state"] == "busy" and result["returncode"] == EXIT_BUSY, result
    assert run_status(busy)["state"] == "busy" and not (busy.path / "train.csv").exists()


# ---------------------------------------------------------------------------------------------------- ray


@pytest.mark.slow
def test_ray_sweep_retries_a_run_whose_worker_was_killed(tmp_path):
    """A real local Ray cluster; one task SIGKILLs its own worker after the run's first checkpoint. Its train
    process checkpoints on its runner's death, Ray retries the task, and the retry resumes the run."""
    ray = pytest.importorskip("ray")
    specs = tiny_specs(tmp_path)
    specs[0] = dataclasses.replace(longer(specs[0]), kill_first_attempt=True)
    path = write_sweep_file(tmp_path / "sweeps" / "ray.json", "ray", specs)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        assert sweep_main(["--from", str(path), "--backend", "ray", "--retries", "2"]) == 0, describe(specs)
    finally:
        ray.shutdown()
    for s in specs:
        assert_completed_once(s)
    killed = specs[0]
    assert (killed.path / TEST_KILL_MARKER).is_file()
    first, second = attempts(killed)
    assert "checkpointing, then exiting" in first  # SIGTERM from PR_SET_PDEATHSIG when the worker died
    assert "Resuming" in second
    assert all(len(attempts(s)) == 1 for s in specs[1:])


# ---------------------------------------------------------------------------------------------------- slurm


@pytest.mark.slow
def test_submitit_job_array_requeues_a_preempted_run_which_resumes(tmp_path):
    """submitit's LocalExecutor runs the Slurm code path; SIGUSR2 to a job is what Slurm sends before a
    time limit (or on pre-emption): the run checkpoints, is requeued and resumes from its checkpoint."""
    pytest.importorskip("submitit")
    specs = tiny_specs(tmp_path, games=("CartPole",))
    specs[0] = longer(specs[0])
    path = write_sweep_file(tmp_path / "sweeps" / "slurm.json", "slurm", specs)
    assert sweep_main(["--from", str(path), "--backend", "slurm", "--submitit-cluster", "local",
                       "--time-min", "30"]) == 0
    target = specs[0]
    wait_until(lambda: (target.path / "checkpoints" / "LATEST").is_file(), "the run's first checkpoint")
    runner = json.loads((target.path / STATUS_NAME).read_text())["runner_pid"]
    os.kill(runner, signal.SIGUSR2)
    wait_until(lambda: all((s.path / DONE_NAME).is_file() for s in specs), "every job to finish")
    wait_until(lambda: json.loads((target.path / STATUS_NAME).read_text())["state"] == "exited", "the runner to exit")
    for s in specs:
        assert_completed_once(s)
    first, second = attempts(target)
    assert "checkpointing, then exiting" in first and "Resuming" in second
    assert len(attempts(specs[1])) == 1
