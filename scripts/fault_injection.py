"""Fault injection: SIGKILL real training runs at random moments, resume them, and check that they end
exactly where an uninterrupted run of the same seed and budget ends.

Each trial starts a small real run as a subprocess (``python -m dqn_atari train ...``) and kills it with
SIGKILL one to ``--max-kills`` times, each time either

- at a random point of the run: once it has logged an episode at or past a random agent step, plus up to
  a second (so during start-up, resume loading, acting, learning, an evaluation or a checkpoint), or
- the instant a checkpoint write begins (a new ``.tmp_step_*`` directory appears), to land inside it;

then restarts the same command, which resumes from the last complete checkpoint. After each kill every
checkpoint generation is verified (MANIFEST sha256s and every replay chunk's CRC-32): a kill must never
leave a damaged ``step_*`` generation, so any found is counted as corrupt. With ``--corrupt-prob`` the
newest generation is then deliberately damaged (a flipped byte, a truncated or deleted file), and the
resume must report it and fall back to the previous generation. When the run has finished, its final
weights and its train/eval CSVs (every column except wall_time) must equal the uninterrupted reference
run's, bit for bit (CPU).

Tasks: ``cartpole`` turns every switch on (double, dueling, C51, noisy nets, n-step 3, prioritized replay,
3 environments), so every piece of resume state is exercised; ``atari`` is a smoke-sized Nature DQN run on
Breakout (real emulator, CNN, uint8 frame replay). Both are far too short to learn anything.

    .venv/bin/python scripts/fault_injection.py --trials 20 --seed 0 --task both

Prints one line per trial, totals, and ends with one line of JSON; exits 1 if any run failed, any
checkpoint was found corrupt, any injected damage went unreported, or any run differs from its reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dqn_atari.checkpoint import generations, inspect_checkpoints  # noqa: E402

# Small budgets with every periodic event (replay start, target syncs, evaluations, checkpoints) happening
# several times; periods are not multiples of the number of envs, so checkpoints fall between boundaries.
TASKS: dict[str, tuple[str, list[str], int]] = {
    # (config file, overrides, the run's agent steps: frames / frame skip)
    "cartpole": ("configs/control/cartpole.yaml", [
        "train.frames=1200", "env.num_envs=3", "agent.double=true", "network.dueling=true", "network.head=c51",
        "network.noisy=true", "agent.n_step=3", "replay.prioritized=true", "replay.capacity=6000",
        "train.replay_start_steps=300", "train.update_period_steps=2", "train.batch_size=32",
        "agent.target_update_steps=200", "train.checkpoint_period_steps=250", "train.log_period_steps=100",
        "eval.period_steps=500", "eval.episodes=3", "eval.num_envs=3", "eval.max_steps=300",
    ], 1200),
    "atari": ("configs/nature_dqn.yaml", [
        "env.game=Breakout", "train.frames=2400", "replay.capacity=2000", "train.replay_start_steps=200",
        "agent.target_update_steps=150", "train.epsilon_decay_steps=400", "train.checkpoint_period_steps=250",
        "train.log_period_steps=100", "eval.period_steps=300", "eval.episodes=1", "eval.num_envs=1",
        "eval.max_steps=300", "eval.max_episode_frames=1200",
    ], 600),
}
COMMON = ["device=cpu", "torch_threads=1", "seed=1"]
FALLBACK_TEXT = "Resumed from the older checkpoint"


@dataclass
class TrialResult:
    trial: int
    task: str
    kills: int = 0
    kills_during_checkpoint_write: int = 0
    resumes: int = 0
    corrupt_checkpoints_found: int = 0
    injected_corruptions: int = 0
    fallbacks_detected: int = 0
    undetected_corruptions: int = 0
    failed: str = ""
    mismatch: str = ""
    notes: list[str] = field(default_factory=list)


def train_command(task: str, runs_root: Path) -> list[str]:
    config, overrides, _ = TASKS[task]
    return [sys.executable, "-m", "dqn_atari", "train", config, *overrides, *COMMON, f"runs_root={runs_root}",
            "--no-progress"]


def start(task: str, runs_root: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(log, "w")
    try:
        return subprocess.Popen(train_command(task, runs_root), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        out.close()  # the child holds its own copy of the descriptor


def run_dir(runs_root: Path) -> Path | None:
    found = sorted(runs_root.glob("*/*/seed*"))
    return found[0] if found else None


def _tmp_dirs(runs_root: Path) -> set[int]:
    """Inodes of the ``.tmp_step_*`` directories (checkpoint writes under way or left by a kill)."""
    run = run_dir(runs_root)
    try:
        return {e.inode() for e in os.scandir(run / "checkpoints") if e.name.startswith(".tmp_step_")} if run else set()
    except FileNotFoundError:
        return set()


def wait_for_checkpoint_write(proc: subprocess.Popen, runs_root: Path, old: set[int], nth: int,
                              poll_s: float = 0.001) -> bool:
    """True the moment the ``nth`` new ``.tmp_step_*`` directory exists (that checkpoint write has begun);
    False if the process exits first."""
    seen = set(old)
    began = 0
    while proc.poll() is None:
        new = _tmp_dirs(runs_root) - seen
        if new:
            began += 1
            seen |= new
            if began >= nth:
                return True
        time.sleep(poll_s)
    return False


def last_agent_step(runs_root: Path) -> int:
    """agent_step of the last complete row of train.csv (-1 before the first)."""
    run = run_dir(runs_root)
    try:
        lines = (run / "train.csv").read_text().splitlines() if run else []
    except FileNotFoundError:
        return -1
    try:
        return int(lines[-1].split(",")[0]) if len(lines) > 1 else -1
    except ValueError:  # a row being appended right now
        return -1


def wait_for_progress(proc: subprocess.Popen, runs_root: Path, target: int, extra_s: float,
                      poll_s: float = 0.02) -> bool:
    """True once the run has logged an episode at or past agent step ``target`` and ``extra_s`` more seconds
    have passed (a kill at a random point of training, however loaded the machine is); False if it exits."""
    while proc.poll() is None and last_agent_step(runs_root) < target:
        time.sleep(poll_s)
    try:
        proc.wait(timeout=extra_s)
        return False
    except subprocess.TimeoutExpired:
        return True


def corrupt_newest(ckpt_root: Path, rng: np.random.Generator) -> tuple[Path, str] | None:
    """Damage the newest generation when an older complete one exists; only files that belong to it alone
    (a replay chunk shared by hard link with the previous generation would damage both)."""
    gens = [g for g, problem in inspect_checkpoints(ckpt_root) if problem is None]
    if len(gens) < 2 or gens[0] != generations(ckpt_root)[0]:
        return None
    gen = gens[0]
    own_chunks = [p for p in (gen / "replay").glob("*.npy") if p.stat().st_nlink == 1]
    kinds = ["flip tensors.safetensors", "truncate state.json", "delete MANIFEST.json", "flip replay/manifest.json"]
    kinds += ["flip a replay chunk"] if own_chunks else []
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind.startswith("flip"):
        path = {"flip tensors.safetensors": gen / "tensors.safetensors",
                "flip replay/manifest.json": gen / "replay" / "manifest.json"}.get(kind)
        path = path or own_chunks[int(rng.integers(len(own_chunks)))]
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x5A  # inside the data (the last byte of a JSON file may be a newline or brace)
        path.write_bytes(bytes(data))
    elif kind == "truncate state.json":
        path = gen / "state.json"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        (gen / "MANIFEST.json").unlink()
    return gen, kind


def compare(run_a: Path, run_b: Path) -> str:
    """'' when both runs ended identically (weights, CSVs except wall_time), else what differs."""
    from safetensors.numpy import load_file

    for name in ("train.csv", "eval.csv"):
        rows = []
        for run in (run_a, run_b):
            lines = (run / name).read_text().splitlines()
            header = lines[0].split(",")
            keep = [i for i, h in enumerate(header) if h != "wall_time"]
            rows.append([[cells[i] for i in keep] for cells in (line.split(",") for line in lines)])
        if rows[0] != rows[1]:
            diff = next((i for i, (x, y) in enumerate(zip(*rows)) if x != y), min(map(len, rows)))
            return f"{name} differs (first at line {diff + 1}; {len(rows[0])} vs {len(rows[1])} lines)"
    wa, wb = load_file(str(run_a / "model.safetensors")), load_file(str(run_b / "model.safetensors"))
    if wa.keys() != wb.keys():
        return "model.safetensors holds different tensors"
    differing = [k for k in wa if not np.array_equal(wa[k], wb[k])]
    return f"final weights differ: {differing[:3]}" if differing else ""


def run_reference(task: str, workdir: Path) -> tuple[Path, float]:
    runs_root = workdir / f"reference_{task}"
    log = workdir / f"reference_{task}.log"
    began = time.perf_counter()
    proc = start(task, runs_root, log)
    rc = proc.wait()
    run = run_dir(runs_root)
    if rc != 0 or run is None or not (run / "DONE").exists():
        raise RuntimeError(f"the uninterrupted {task} run failed (exit {rc}); see {log}:\n{log.read_text()[-2000:]}")
    return run, time.perf_counter() - began


def run_trial(trial: int, task: str, workdir: Path, rng: np.random.Generator, reference: Future,
              max_kills: int, checkpoint_kill_prob: float, corrupt_prob: float) -> TrialResult:
    res = TrialResult(trial, task)
    runs_root = workdir / f"trial{trial:03d}_{task}"
    kills_left = int(rng.integers(1, max_kills + 1))
    injected: set[str] = set()  # generations we damaged on purpose (not counted as corrupt)
    pending_fallback = False
    for attempt in range(kills_left + 8):
        log = runs_root.parent / f"{runs_root.name}.{attempt}.log"
        runs_root.mkdir(parents=True, exist_ok=True)
        if res.kills:
            res.resumes += 1
        old_tmp = _tmp_dirs(runs_root)
        proc = start(task, runs_root, log)
        killed = False
        if kills_left > 0:
            if rng.random() < checkpoint_kill_prob:
                killed = wait_for_checkpoint_write(proc, runs_root, old_tmp, nth=int(rng.integers(1, 3)))
            else:
                # Anywhere from start-up (target below the resumed step) to the end of training.
                target = int(rng.integers(0, TASKS[task][2]))
                killed = wait_for_progress(proc, runs_root, target, float(rng.uniform(0.0, 1.0)))
            if killed:
                proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        killed = rc == -signal.SIGKILL  # False if it finished on its own just before the kill
        output = log.read_text(errors="replace")
        if pending_fallback and "Resuming" in output:
            pending_fallback = False
            if FALLBACK_TEXT in output:
                res.fallbacks_detected += 1
            else:
                res.undetected_corruptions += 1
        run = run_dir(runs_root)
        if killed:
            kills_left -= 1
            res.kills += 1
            ckpt_root = run / "checkpoints" if run else None
            if ckpt_root is None or not ckpt_root.exists():
                continue
            if _tmp_dirs(runs_root) - old_tmp:
                res.kills_during_checkpoint_write += 1
            for gen, problem in inspect_checkpoints(ckpt_root):
                if problem is None:
                    injected.discard(gen.name)  # rewritten since we damaged it
                elif gen.name not in injected:
                    res.corrupt_checkpoints_found += 1
                    res.notes.append(f"corrupt after a kill: {problem}")
            if not pending_fallback and rng.random() < corrupt_prob:
                damaged = corrupt_newest(ckpt_root, rng)
                if damaged is not None:
                    injected.add(damaged[0].name)
                    res.injected_corruptions += 1
                    res.notes.append(f"damaged {damaged[0].name}: {damaged[1]}")
                    pending_fallback = True
            continue
        if rc != 0 or run is None or not (run / "DONE").exists():
            res.failed = f"exit {rc}: {output.strip().splitlines()[-1] if output.strip() else 'no output'} ({log})"
            return res
        if res.kills == 0:  # finished before its kill point came (e.g. no episode logged past the target)
            shutil.rmtree(runs_root)
            continue  # start afresh with new kill points: every trial is killed at least once
        break
    else:
        res.failed = "the run never finished"
        return res
    if pending_fallback:
        res.undetected_corruptions += 1  # the damaged generation was never resumed from nor reported
    try:
        ref_run, _ = reference.result()
    except RuntimeError as exc:
        res.failed = str(exc)
        return res
    res.mismatch = compare(ref_run, run)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="number of trials (runs killed and resumed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (the runs use seed=1)")
    parser.add_argument("--task", choices=["cartpole", "atari", "both"], default="both",
                        help="both: trials alternate cartpole, atari, cartpole, ...")
    parser.add_argument("--max-kills", type=int, default=3, help="most SIGKILLs per trial (at least 1)")
    parser.add_argument("--checkpoint-kill-prob", type=float, default=0.4,
                        help="chance that a kill waits for a checkpoint write to begin")
    parser.add_argument("--corrupt-prob", type=float, default=0.25,
                        help="chance, after a kill, of damaging the newest checkpoint generation on purpose")
    parser.add_argument("--jobs", type=int, default=2, help="trials run at once (the reference runs go alongside)")
    parser.add_argument("--workdir", default=None, help="where runs go, kept afterwards (default: a temporary "
                                                         "directory, deleted unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.max_kills < 1 or args.jobs < 1:
        parser.error("--trials, --max-kills and --jobs must be at least 1")

    tasks = ["cartpole", "atari"] if args.task == "both" else [args.task]
    plan = [tasks[i % len(tasks)] for i in range(args.trials)]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fault_injection_"))
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence(args.seed).spawn(args.trials)
    began = time.perf_counter()
    print(f"fault injection: {args.trials} trials ({', '.join(f'{plan.count(t)} {t}' for t in tasks)}), seed "
          f"{args.seed}, work dir {workdir}", flush=True)
    lock = threading.Lock()
    results: list[TrialResult] = []
    try:
        # The uninterrupted reference runs go alongside the first trials (their threads only wait).
        with ThreadPoolExecutor(max_workers=len(tasks)) as ref_pool, ThreadPoolExecutor(max_workers=args.jobs) as pool:
            references = {t: ref_pool.submit(run_reference, t, workdir) for t in tasks}

            def one(i: int) -> TrialResult:
                res = run_trial(i, plan[i], workdir, np.random.default_rng(seeds[i]), references[plan[i]],
                                args.max_kills, args.checkpoint_kill_prob, args.corrupt_prob)
                verdict = ("FAILED: " + res.failed if res.failed else "MISMATCH: " + res.mismatch if res.mismatch
                           else "identical to the uninterrupted run")
                with lock:
                    print(f"trial {i} {res.task}: {res.kills} kills ({res.kills_during_checkpoint_write} during a "
                          f"checkpoint write), {res.resumes} resumes, {res.corrupt_checkpoints_found} corrupt "
                          f"checkpoints, {res.injected_corruptions} damaged on purpose ({res.fallbacks_detected} "
                          f"reported and skipped); {verdict}", flush=True)
                    for note in res.notes:
                        print(f"    {note}", flush=True)
                return res

            results = list(pool.map(one, range(args.trials)))
            ref_seconds = {t: round(f.result()[1], 1) if f.exception() is None else None
                           for t, f in references.items()}
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    totals = {k: sum(getattr(r, k) for r in results) for k in (
        "kills", "kills_during_checkpoint_write", "resumes", "corrupt_checkpoints_found", "injected_corruptions",
        "fallbacks_detected", "undetected_corruptions")}
    summary = {
        "script": "fault_injection", "task": args.task, "seed": args.seed, "trials": args.trials,
        "trials_by_task": {t: plan.count(t) for t in tasks}, **totals,
        "failed_runs": sum(bool(r.failed) for r in results), "mismatches": sum(bool(r.mismatch) for r in results),
        "reference_seconds": ref_seconds, "seconds": round(time.perf_counter() - began, 1),
    }
    summary["ok"] = not (summary["failed_runs"] or summary["mismatches"] or totals["corrupt_checkpoints_found"]
                         or totals["undetected_corruptions"])
    print(f"{summary['trials']} trials, {totals['kills']} kills ({totals['kills_during_checkpoint_write']} during a "
          f"checkpoint write), {totals['resumes']} resumes, {totals['corrupt_checkpoints_found']} corrupt checkpoints "
          f"found, {totals['injected_corruptions']} damaged on purpose ({totals['fallbacks_detected']} reported and "
          f"skipped), {summary['failed_runs']} failed runs, {summary['mismatches']} mismatches")
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
