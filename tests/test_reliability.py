"""Reliability and safety (issue 9): crash-safe checkpoints, fault injection, exact resume of every component,
clear errors on bad input that never lose what is written, loading that cannot run code, clean signals.

Disk-full tests: a real tmpfs of a few MB when ``mount -t tmpfs`` is permitted (skipped cleanly when not),
and, always, an injected ENOSPC at the OS boundary (the checkpoint's ``_write_bytes`` and the replay's
``_write_chunk``, the two functions through which every checkpoint byte is written).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from dqn_atari import checkpoint as ckpt
from dqn_atari.cli import build_config, main
from dqn_atari.replay import ReplayBuffer, available_memory_bytes
from dqn_atari.rundir import RunDir
from dqn_atari.train import Trainer
from same_run import assert_same_run

ROOT = Path(__file__).resolve().parent.parent
CARTPOLE = "configs/control/cartpole.yaml"
NATURE = "configs/nature_dqn.yaml"
# A small CartPole run: replay start, target syncs, checkpoints (200, 400, ...) and evaluations all happen.
SMALL = ["device=cpu", "torch_threads=1", "train.frames=900", "train.replay_start_steps=200",
         "train.checkpoint_period_steps=200", "train.log_period_steps=50", "agent.target_update_steps=100",
         "eval.period_steps=450", "eval.episodes=2", "eval.num_envs=2", "eval.max_steps=300",
         # pinned here so that these tests do not move when the CartPole layer is retuned for learning
         "train.update_period_steps=1", "train.epsilon_end=0.02"]
# Every switch that carries resume state: double, dueling, a distributional head, noisy nets, n-step 3,
# prioritized replay (priorities, max priority, beta schedule) and 3 environments.
EVERYTHING = ["env.num_envs=3", "agent.double=true", "network.dueling=true", "network.noisy=true",
              "agent.n_step=3", "replay.prioritized=true", "train.update_period_steps=2", "train.batch_size=32"]


def cartpole_argv(runs_root: Path, *extra: str) -> list[str]:
    return ["train", CARTPOLE, f"runs_root={runs_root}", *SMALL, *extra, "--no-progress"]


def cartpole_cfg(runs_root: Path, *extra: str):
    return build_config(ROOT / CARTPOLE, [f"runs_root={runs_root}", *SMALL, *extra])


def run_path(runs_root: Path) -> Path:
    return Path(runs_root) / "nature_dqn" / "CartPole" / "seed1"


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (to show nothing already written changed)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/ paths are relative, as on the command line


@pytest.fixture(scope="module")
def started_run(tmp_path_factory) -> Path:
    """runs_root of a CartPole run interrupted at agent step 450: generations step 400 and step 450."""
    root = tmp_path_factory.mktemp("started") / "runs"
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        Trainer(cartpole_cfg(root), progress=False).train(interrupt_at_step=450)
    finally:
        os.chdir(old)
    gens = [g.name for g in ckpt.generations(run_path(root) / "checkpoints")]
    assert gens == ["step_000000000450", "step_000000000400"]
    return root


@pytest.fixture
def run_copy(started_run, tmp_path) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(started_run, root)
    return root


# ---------------------------------------------------------------------------------------------------------
# 1. Crash safety of the checkpoint writer: a kill at every write, rename and link of a save
# ---------------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no cleanup code of the writer can catch it."""


def _tiny_replay() -> ReplayBuffer:
    return ReplayBuffer(capacity=200, frame_shape=(4,), frame_dtype=np.float32, stack=1, chunk_slots=100)


def _fill(replay: ReplayBuffer, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for t in range(steps):
        end = np.array([t % 17 == 16])
        replay.add(rng.random((1, 4), dtype=np.float32), np.array([t % 2]), np.array([1.0], np.float32),
                   end, end, rng.random((1, 4), dtype=np.float32))


@pytest.fixture
def memory_dir(tmp_path):
    """A directory on /dev/shm (a tmpfs, where fsync costs nothing) when there is one, else tmp_path: for
    tests of the order of operations, which do not need durable writes but make hundreds of fsyncs."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="dqn_atari_test_", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_kill_at_any_point_of_a_save_leaves_a_complete_generation(memory_dir, monkeypatch):
    """Count the save's write/rename/link operations, then kill it before each one in turn: every
    ``step_*`` left verifies, a resume gets either the old or the new generation whole, and the next save
    clears the debris."""
    tmp_path = memory_dir
    points = {"n": 0, "kill_at": None}
    real = {"replace": os.replace, "link": os.link, "bytes": ckpt._write_bytes}
    from dqn_atari.replay import storage

    real["chunk"] = storage._write_chunk

    def counted(name):
        def op(*args, **kwargs):
            points["n"] += 1
            if points["n"] == points["kill_at"]:
                raise Killed()
            return real[name](*args, **kwargs)
        return op

    monkeypatch.setattr(os, "replace", counted("replace"))
    monkeypatch.setattr(os, "link", counted("link"))
    monkeypatch.setattr(ckpt, "_write_bytes", counted("bytes"))
    monkeypatch.setattr(storage, "_write_chunk", counted("chunk"))

    def save(root: Path, replay: ReplayBuffer, step: int) -> None:
        ckpt.save_checkpoint(root, step, {"w": torch.full((3,), float(step))}, {"step": step}, replay.save)

    def setup(root: Path) -> ReplayBuffer:
        replay = _tiny_replay()
        _fill(replay, 150, seed=0)
        save(root, replay, 100)  # the good generation every kill must leave usable
        _fill(replay, 40, seed=1)  # some chunks change, some do not: the next save links and rewrites
        return replay

    replay = setup(tmp_path / "count")
    points["n"] = 0
    save(tmp_path / "count", replay, 200)
    total = points["n"]
    assert total > 10, "the save should have many write points"

    resumed_from = set()
    for kill_at in range(1, total + 1):
        root = tmp_path / f"k{kill_at}"
        points.update(n=0, kill_at=None)
        replay = setup(root)
        points.update(n=0, kill_at=kill_at)
        with pytest.raises(Killed):
            save(root, replay, 200)
        points["kill_at"] = None
        for gen, problem in ckpt.inspect_checkpoints(root):
            assert problem is None, f"kill at point {kill_at}/{total}: {problem}"
        got = {}
        used = ckpt.load_checkpoint(root, lambda t, s, g: got.update(step=s["step"], w=t["w"]))
        assert got["step"] in (100, 200) and used.name == f"step_{got['step']:012d}"
        assert torch.equal(got["w"], torch.full((3,), float(got["step"])))
        resumed_from.add(got["step"])
        _tiny_replay().load(used / "replay")  # its replay is whole (every chunk's CRC is checked)
        save(root, replay, 300)  # clears the debris; keeps the generation resumed from
        assert sorted(p.name for p in root.iterdir()) == ["LATEST", used.name, "step_000000000300"]
    assert resumed_from == {100, 200}, "kills before the rename keep step 100, kills after it give step 200"


def test_generations_from_an_abandoned_timeline_are_removed_on_the_next_save(tmp_path):
    """A resume that fell back to step 100 because step 150 was damaged: the next save (step 200) removes
    step 150, which would otherwise be kept as 'the previous checkpoint' in place of a good one."""
    for step in (100, 150):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {"step": step}, keep=3)
    (tmp_path / "step_000000000150" / "state.json").write_text("{}")
    with pytest.warns(ckpt.CheckpointWarning, match="step_000000000150"):
        used = ckpt.load_checkpoint(tmp_path, lambda t, s, g: None)
    assert used.name == "step_000000000100"
    ckpt.save_checkpoint(tmp_path, 200, {"w": torch.ones(2)}, {"step": 200}, link_from=used)
    assert [g.name for g in ckpt.generations(tmp_path)] == ["step_000000000200", "step_000000000100"]


# ---------------------------------------------------------------------------------------------------------
# 2. Fault injection with real processes and SIGKILL
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fault_injection_script_runs_clean():
    """scripts/fault_injection.py, a few trials: 2 CartPole (every switch on) and 1 Atari."""
    out = subprocess.run([sys.executable, "scripts/fault_injection.py", "--trials", "3", "--task", "both",
                          "--seed", "0", "--max-kills", "2", "--corrupt-prob", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(out.stdout[-4000:], out.stderr[-2000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["trials_by_task"] == {"cartpole": 2, "atari": 1}
    assert summary["kills"] >= 1 and summary["resumes"] >= 1
    assert summary["failed_runs"] == 0 and summary["mismatches"] == 0
    assert summary["corrupt_checkpoints_found"] == 0 and summary["undetected_corruptions"] == 0
    assert summary["ok"] and out.returncode == 0


# ---------------------------------------------------------------------------------------------------------
# 3. Resume fidelity of every component
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["c51", pytest.param("iqn", marks=pytest.mark.slow)])
def test_everything_on_resume_is_bit_identical_including_a_signal_during_evaluation(tmp_path, monkeypatch, head):
    """Double + dueling + C51/IQN + noisy + n-step 3 + prioritized + 3 envs, stopped three times at steps
    that are not checkpoint or evaluation boundaries, once of them by a SIGTERM that arrives in the middle
    of an evaluation (which stops it at once, as train.evaluate's docstring says, to be played again on
    resume), ends bit-identical to the run that was never stopped."""
    extra = [*EVERYTHING, f"network.head={head}", "train.frames=1500", "train.checkpoint_period_steps=250",
             "eval.period_steps=500", "eval.num_envs=3", "eval.episodes=3"]
    whole = Trainer(cartpole_cfg(tmp_path / "whole", *extra), progress=False).train()
    assert whole.is_done

    import dqn_atari.train as train_module

    real_evaluate = train_module.evaluate
    signalled = []

    def evaluate_with_a_signal(agent, cfg, eval_index, *args, **kwargs):
        if eval_index == 1 and not signalled:  # the evaluation at agent step 1000 (after a resume)
            signalled.append(eval_index)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(agent, cfg, eval_index, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate_with_a_signal)
    parts_cfg = cartpole_cfg(tmp_path / "parts", *extra)
    for stop in (401, 713):  # agent steps advance by 3: stops at 402 and 714
        run = Trainer(parts_cfg, progress=False).train(interrupt_at_step=stop)
        assert not run.is_done
    run = Trainer(parts_cfg, progress=False).train()  # SIGTERM during the evaluation at step 1002
    assert signalled and not run.is_done
    assert run.eval["agent_step"].tolist()[-1] < 1002, "the evaluation went on after the stop"
    assert ckpt.generations(run.path / "checkpoints")[0].name == "step_000000001002"
    run = Trainer(parts_cfg, progress=False).train()
    assert run.is_done
    assert_same_run(whole.path, run.path)


def test_a_compiled_run_resumes_bit_identical(tmp_path):
    """compile=true (torch.compile of the update and the optimizer step): a run stopped and resumed, which
    rebuilds the optimizer state the compiled step works on, ends as the run that was never stopped."""
    whole = Trainer(cartpole_cfg(tmp_path / "whole", "compile=true"), progress=False).train()
    parts_cfg = cartpole_cfg(tmp_path / "parts", "compile=true")
    assert not Trainer(parts_cfg, progress=False).train(interrupt_at_step=450).is_done
    run = Trainer(parts_cfg, progress=False).train()
    assert whole.is_done and run.is_done
    assert_same_run(whole.path, run.path)


def test_evaluation_is_a_pure_function_of_weights_and_index(tmp_path):
    """IQN draws quantile fractions from torch's RNG while acting: evaluation must neither depend on nor move
    the training stream."""
    from dqn_atari.train import evaluate

    cfg = cartpole_cfg(tmp_path, "network.head=iqn", "eval.episodes=2")
    agent = Trainer(cfg, progress=False).agent
    torch.manual_seed(123)
    first = evaluate(agent, cfg, eval_index=4, max_steps=200)
    after = torch.rand(3)
    torch.manual_seed(999)
    second = evaluate(agent, cfg, eval_index=4, max_steps=200)
    torch.manual_seed(123)
    assert first == second and torch.equal(after, torch.rand(3))


# ---------------------------------------------------------------------------------------------------------
# 4. Bad input: clear one-paragraph errors, non-zero exit, nothing written lost
# ---------------------------------------------------------------------------------------------------------

BAD_INPUT = [
    # (id, argv after "train", exit code, fragments of the message)
    ("unknown game", [NATURE, "env.game=Breakoutt"], 2, ["Unknown Atari game 'Breakoutt'", "Breakout"]),
    ("misspelled key", [NATURE, "agent.lrr=0.001"], 2, ["Unknown config key 'agent.lrr'", "Did you mean 'agent.lr'"]),
    ("unknown key in the file", ["BAD_YAML", "seed=1"], 2, ["Unknown config key 'agnet'", "'agent"]),
    ("wrong type", [NATURE, "agent.lr=fast"], 2, ["agent.lr must be a number, got 'fast'", "Fix it"]),
    ("negative learning rate", [NATURE, "agent.lr=-0.001"], 2, ["agent.lr must be positive", "Fix it"]),
    ("batch 0", [NATURE, "train.batch_size=0"], 2, ["train.batch_size must be >= 1, got 0", "Fix it"]),
    ("discount above 1", [NATURE, "agent.discount=1.5"], 2, ["agent.discount must be in (0, 1], got 1.5"]),
    ("n-step 0", [NATURE, "agent.n_step=0"], 2, ["agent.n_step must be >= 1, got 0"]),
    ("fewer than 2 atoms", [NATURE, "network.head=c51", "network.num_atoms=1"], 2,
     ["network.num_atoms must be at least 2"]),
    ("missing config file", ["configs/no_such_variant.yaml"], 2, ["does not exist", "nature_dqn"]),
    ("replay too big for memory", [NATURE, "env.game=Pong", "replay.capacity=100000000"], 1,
     ["replay memory needs", "Lower replay.capacity"]),
    ("network too big for memory", [NATURE, "network.hidden=100000000000", "replay.capacity=1000"], 1,
     ["out of memory", "network's size"]),
    ("YAML boolean for a name", [NATURE, "env.game=on"], 2, ["env.game must be a string, got True (quote it)"]),
    ("boolean episode cap", [NATURE, "eval.max_episode_frames=true"], 2,
     ["eval.max_episode_frames must be an integer, got True"]),
    ("protocol switch not a boolean", [NATURE, "env.overrides.full_action_space=maybe"], 2,
     ["env.overrides.full_action_space in a run's config) must be true or false, got 'maybe'"]),
    ("protocol number not a number", [NATURE, "env.overrides.noop_max=abc"], 2,
     ["env.overrides.noop_max in a run's config) must be a finite number, got 'abc'"]),
    ("seed beside a seed list", [NATURE, "seeds=[1,2]", "seed=3"], 2,
     ["Remove seed= from the overrides: seeds=[...] sets every run's seed"]),
]


@pytest.mark.parametrize("argv, code, fragments", [row[1:] for row in BAD_INPUT], ids=[row[0] for row in BAD_INPUT])
def test_bad_input_is_one_clear_paragraph_and_creates_nothing(argv, code, fragments, tmp_path, capsys, monkeypatch):
    from dqn_atari.envs.base import VectorEnv

    def no_stepping(*_a, **_k):
        raise AssertionError("the environment was stepped before the input was checked")

    monkeypatch.setattr(VectorEnv, "step", no_stepping)  # e.g. the replay memory is checked before any work
    if argv[0] == "BAD_YAML":
        bad = tmp_path / "bad.yaml"
        bad.write_text("agnet:\n  lr: 0.001\n")
        argv = [str(bad), *argv[1:]]
    runs_root = tmp_path / "runs"
    rc = main(["train", *argv, f"runs_root={runs_root}", "device=cpu", "torch_threads=1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one paragraph
    for fragment in fragments:
        assert fragment in err
    assert not runs_root.exists(), "nothing may be written for bad input"


def test_a_run_that_cannot_start_releases_its_environment(tmp_path, monkeypatch):
    """The replay memory check comes after the env is built: when it refuses, the env (its C++ worker threads
    and emulators) is closed, so a process that goes on (a sweep, a notebook) does not keep them."""
    from dqn_atari import train as train_module

    made = []
    real = train_module.make_train_env
    monkeypatch.setattr(train_module, "make_train_env", lambda *args: made.append(real(*args)) or made[-1])
    cfg = build_config(NATURE, [f"runs_root={tmp_path}", "env.game=Pong", "replay.capacity=100000000", "device=cpu"])
    with pytest.raises(Exception, match="replay memory needs"):
        Trainer(cfg, progress=False)
    assert len(made) == 1
    with pytest.raises(RuntimeError, match="is closed"):  # the env was closed, not left running
        made[0].reset()


def test_resuming_with_a_different_config_is_refused_unless_forced(run_copy, capsys):
    before = snapshot(run_copy)
    rc = main(cartpole_argv(run_copy, "train.epsilon_end=0.2"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "different config" in err and "train.epsilon_end: recorded 0.02, now 0.2" in err and "force=true" in err
    assert snapshot(run_copy) == before
    assert main(cartpole_argv(run_copy, "train.epsilon_end=0.2", "force=true")) == 0
    assert (run_path(run_copy) / "DONE").exists()


@pytest.mark.parametrize("change", ["network.mlp_hidden=[64,64]", "replay.capacity=40000"])
def test_force_cannot_resume_with_a_setting_the_saved_network_or_replay_was_built_for(run_copy, capsys, change):
    """An intact checkpoint that force=true cannot load (another network shape, another replay size) is a config
    error naming the change, not damage: no older generation is tried, and nothing is deleted or rewritten."""
    before = snapshot(run_copy)
    assert main(cartpole_argv(run_copy, change, "force=true")) == 2
    err = capsys.readouterr().err
    assert "force=true cannot resume" in err and change.split("=")[0] in err and "damaged" not in err, err
    assert snapshot(run_copy) == before


def test_a_run_recorded_before_a_config_field_existed_resumes(run_copy):
    """A field added to the config later (here: the HER switches) takes its default, which keeps the old
    behaviour; the run resumes as the same run instead of being refused as a different config."""
    run = run_path(run_copy)
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["replay"]["her_strategy"], config["replay"]["her_k"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for gen in ckpt.generations(run / "checkpoints"):
        state = json.loads((gen / ckpt.STATE).read_text())
        del state["config"]["replay"]["her_strategy"], state["config"]["replay"]["her_k"]
        (gen / ckpt.STATE).write_text(json.dumps(state))
        manifest = json.loads((gen / ckpt.MANIFEST).read_text())
        manifest["files"][ckpt.STATE] = hashlib.sha256((gen / ckpt.STATE).read_bytes()).hexdigest()
        (gen / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert main(cartpole_argv(run_copy)) == 0
    assert (run / "DONE").exists()


def test_a_corrupt_only_checkpoint_is_reported_and_nothing_is_touched(run_copy, capsys):
    ckpt_root = run_path(run_copy) / "checkpoints"
    shutil.rmtree(ckpt_root / "step_000000000400")
    state = ckpt_root / "step_000000000450" / "state.json"
    state.write_text(state.read_text().replace('"agent_step": 450', '"agent_step": 451'))
    before = snapshot(run_copy)
    rc = main(cartpole_argv(run_copy))
    err = capsys.readouterr().err
    assert rc == 1
    assert "No usable checkpoint" in err and "does not match its checksum" in err and "delete" in err
    assert snapshot(run_copy) == before


def test_a_run_whose_checkpoints_are_lost_keeps_its_logs_and_says_how_to_start_over(run_copy, capsys):
    """Checkpoints deleted (or a run directory copied without them) after 450 steps, past the first checkpoint
    at 200: training is refused and train.csv / eval.csv stay as they were; moved aside as the error says, the
    run starts over."""
    run = run_path(run_copy)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run_copy)
    assert len(RunDir(run).eval) and RunDir(run).train["agent_step"].max() > 200
    rc = main(cartpole_argv(run_copy))
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1 and "recorded training up to agent step 450" in err and "holds no checkpoint" in err
    assert snapshot(run_copy) == before
    assert f"mkdir {run / 'old'} && mv {run / 'train.csv'} {run / 'eval.csv'} {run / 'old'}/" in err
    (run / "old").mkdir()
    for name in ("train.csv", "eval.csv"):
        (run / name).rename(run / "old" / name)
    assert main(cartpole_argv(run_copy)) == 0
    assert (run / "DONE").exists()
    assert snapshot(run / "old") == {name: before[f"nature_dqn/CartPole/seed1/{name}"]
                                     for name in ("train.csv", "eval.csv")}


def test_a_crash_before_the_first_checkpoint_was_complete_starts_over(run_copy, tmp_path):
    """No checkpoint, and logs up to the first checkpoint's step (200) at most, as when the process died while
    writing it: the run starts again from step 0 (it plays the same steps again) and rewrites its logs."""
    run = run_path(run_copy)
    shutil.rmtree(run / "checkpoints")
    RunDir(run).truncate_after(200)
    assert RunDir(run).train["agent_step"].max() > 150
    assert main(cartpole_argv(run_copy)) == 0
    whole = tmp_path / "whole"
    assert main(cartpole_argv(whole)) == 0
    assert_same_run(run_path(whole), run)  # the same steps, each logged once


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(run_copy, tmp_path, capsys):
    replay_dir = run_path(run_copy) / "checkpoints" / "step_000000000450" / "replay"
    chunk = sorted(p for p in replay_dir.glob("frames.*.npy") if p.stat().st_nlink == 1)[-1]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF  # bit rot in a replay chunk: only the replay's own CRC-32 can notice
    chunk.write_bytes(bytes(data))
    with pytest.warns(ckpt.CheckpointWarning, match="CRC-32"):
        assert main(cartpole_argv(run_copy)) == 0
    assert "Resuming" in capsys.readouterr().out
    # The run repeated steps 401..450 from the good generation and ended like an uninterrupted run.
    whole = tmp_path / "whole"
    assert main(cartpole_argv(whole)) == 0
    assert_same_run(run_path(whole), run_path(run_copy))


@pytest.mark.parametrize("prioritized", [False, True])
def test_nan_loss_stops_with_diagnostics_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch,
                                                                            prioritized):
    from dqn_atari.agent import Agent

    real_update = Agent.update

    def diverging_update(self, batch):
        out = real_update(self, batch)
        if self.updates == 120:  # agent step 320: after the checkpoint at 200, before the one at 400
            with torch.no_grad():
                for p in self.online.parameters():
                    p.fill_(float("nan"))
        return out

    monkeypatch.setattr(Agent, "update", diverging_update)
    root = tmp_path / "runs"
    rc = main(cartpole_argv(root, f"replay.prioritized={str(prioritized).lower()}"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "NaN or infinite" in err and "agent step" in err and "Q range" in err and "step_000000000200" in err
    gens = ckpt.generations(run_path(root) / "checkpoints")
    assert [g.name for g in gens] == ["step_000000000200"]
    ckpt.verify_generation(gens[0])
    weights = load_file(str(gens[0] / "tensors.safetensors"))
    assert all(np.isfinite(v).all() for k, v in weights.items() if k.startswith("online."))


# ---------------------------------------------------------------------------------------------------------
# Disk full: injected at the OS boundary (always), and a real tmpfs (when mounting is permitted)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["tensors", "replay chunk"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(run_copy, capsys, monkeypatch, where):
    from dqn_atari.replay import storage

    ckpt_root = run_path(run_copy) / "checkpoints"
    before = snapshot(ckpt_root)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "tensors":
        real = ckpt._write_bytes
        monkeypatch.setattr(ckpt, "_write_bytes",
                            lambda path, data: full() if path.name == ckpt.TENSORS else real(path, data))
    else:
        monkeypatch.setattr(storage, "_write_chunk", full)
    rc = main(cartpole_argv(run_copy))
    err = capsys.readouterr().err
    assert rc == 1
    assert "Not enough disk space" in err and "step_000000000450 is intact" in err and "re-run" in err
    assert snapshot(ckpt_root) == before, "the existing generations must be untouched"
    assert not list(ckpt_root.glob(".tmp_*")), "the partial generation is removed"
    monkeypatch.undo()
    monkeypatch.chdir(ROOT)
    assert main(cartpole_argv(run_copy)) == 0  # space freed: the same command resumes and finishes


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def test_a_really_full_disk_keeps_the_previous_checkpoint(small_tmpfs, started_run, capsys):
    root = small_tmpfs / "runs"
    shutil.copytree(started_run, root)
    ckpt_root = run_path(root) / "checkpoints"
    before = snapshot(ckpt_root)
    stat = os.statvfs(small_tmpfs)
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # leave 48 KiB: CSV rows still fit, a checkpoint (~300 KB) does not
        f.truncate(0)
        remaining = stat.f_bavail * stat.f_frsize - 48 * 1024
        block = b"\0" * (1 << 20)
        while remaining > 0:
            remaining -= f.write(block[: min(len(block), remaining)])
    rc = main(cartpole_argv(root))
    err = capsys.readouterr().err
    print(err)
    assert rc == 1 and ("Not enough disk space" in err or "the disk is full" in err), err
    assert snapshot(ckpt_root) == before
    assert not list(ckpt_root.glob(".tmp_*"))
    filler.unlink()
    assert main(cartpole_argv(root)) == 0 and (run_path(root) / "DONE").exists()


# ---------------------------------------------------------------------------------------------------------
# 5. Loading cannot run code
# ---------------------------------------------------------------------------------------------------------


class CreatesFile:
    """A pickle payload: unpickling it calls open(marker, 'w'), creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _plant(gen: Path, target: str, marker: Path) -> None:
    """Replace one file of a generation with a payload and fix every checksum, as an attacker would."""
    manifest_path = gen / ckpt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if target == "tensors.safetensors":
        torch.save({"online.x": CreatesFile(marker)}, gen / target)  # a .pt file renamed: torch.load runs it
    elif target == "replay chunk":
        replay_manifest = json.loads((gen / ckpt.REPLAY_MANIFEST).read_text())
        entry = replay_manifest["arrays"]["frames"]["chunks"][0]
        path = gen / "replay" / entry["file"]
        path.unlink()  # it may be a hard link shared with another generation
        np.save(path, np.array([CreatesFile(marker)], dtype=object), allow_pickle=True)
        entry["nbytes"], entry["crc32"] = path.stat().st_size, zlib.crc32(path.read_bytes())
        (gen / ckpt.REPLAY_MANIFEST).write_text(json.dumps(replay_manifest))
        target = ckpt.REPLAY_MANIFEST
    else:
        (gen / target).write_bytes(pickle.dumps(CreatesFile(marker)))
    if target != ckpt.MANIFEST:
        manifest["files"][target] = hashlib.sha256((gen / target).read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["tensors.safetensors", "state.json", "replay chunk", "replay/manifest.json",
                                    "MANIFEST.json"])
def test_a_checkpoint_crafted_to_run_code_does_not(run_copy, tmp_path, capsys, target):
    marker = tmp_path / "pwned"
    # The payload is live: the unsafe loaders would create the marker.
    pickle.loads(pickle.dumps(CreatesFile(marker)))
    assert marker.exists()
    marker.unlink()
    ckpt_root = run_path(run_copy) / "checkpoints"
    shutil.rmtree(ckpt_root / "step_000000000400")
    gen = ckpt_root / "step_000000000450"
    _plant(gen, target, marker)
    if target == "tensors.safetensors":
        shutil.copy(gen / target, tmp_path / "payload.pt")  # torch.load reads *.safetensors safely by name
        torch.load(tmp_path / "payload.pt", weights_only=False)
        assert marker.exists(), "torch.load without weights_only would have run it"
        marker.unlink()
    rc = main(cartpole_argv(run_copy))
    err = capsys.readouterr().err
    assert rc == 1 and "No usable checkpoint" in err
    with pytest.raises(ckpt.CheckpointError):
        ckpt.verify_generation(gen)
    assert not marker.exists(), "loading the crafted checkpoint ran its code"


def test_no_loader_in_the_package_can_unpickle():
    """The package never calls torch.load without weights_only=True, pickle, np.load with pickles allowed or
    yaml's unsafe loaders (checkpoints, replay saves, configs and run directories are all read safely)."""
    unsafe = [
        (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
        (re.compile(r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b"), "pickle"),
        (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
        (re.compile(r"np\.load\((?![^)]*allow_pickle\s*=\s*False)"), "np.load without allow_pickle=False"),
        (re.compile(r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)|yaml\.(full_load|unsafe_load)"), "yaml unsafe load"),
    ]
    found = []
    for path in sorted((ROOT / "dqn_atari").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in unsafe:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------------------
# 6. SIGINT / SIGTERM on a real training process
# ---------------------------------------------------------------------------------------------------------


def _start(runs_root: Path, log: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "dqn_atari", *cartpole_argv(runs_root, "train.frames=1000000", *extra)]
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def _wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 180.0,
              poll_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never saw {what}; output:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_and_exits(tmp_path, sig):
    root, log = tmp_path / "runs", tmp_path / "train.log"
    proc = _start(root, log)
    _wait_for(lambda: (run_path(root) / "train.csv").exists(), proc, log, "the training loop start")
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    output = log.read_text()
    assert rc == 0, output  # a clean stop, which sweeps and schedulers tell from a failure
    stopped = int(re.search(r"Stopped at agent step ([\d,]+)", output).group(1).replace(",", ""))
    gens = ckpt.generations(run_path(root) / "checkpoints")
    assert gens[0].name == f"step_{stopped:012d}"
    ckpt.verify_generation(gens[0])
    trainer = Trainer(cartpole_cfg(root, "train.frames=1000000"), progress=False)
    try:
        assert trainer.setup() and trainer.counters.agent_step == stopped
    finally:
        trainer.close()


def test_a_second_signal_exits_at_once_without_corrupting_anything(tmp_path):
    """The second SIGTERM lands while the signal's checkpoint is being written (prioritized replay with 2M
    slots: its priorities, 16 MB, are rewritten by every checkpoint). A try whose write won the race against the
    test's poll (exit 0, the checkpoint complete) proves nothing, and is tried again."""
    for attempt in range(3):
        root, log = tmp_path / f"runs{attempt}", tmp_path / f"train{attempt}.log"
        proc = _start(root, log, "replay.prioritized=true", "replay.capacity=2000000", "train.replay_start_steps=100")
        ckpt_root = run_path(root) / "checkpoints"
        _wait_for(lambda: (ckpt_root / "LATEST").exists(), proc, log, "the first periodic checkpoint")
        first = ckpt.generations(ckpt_root)[-1]
        good = snapshot(first)
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: any(p.name.startswith(".tmp_step_") and p.name != f".tmp_{first.name}"
                              for p in ckpt_root.iterdir()), proc, log, "the signal's checkpoint write", poll_s=0.0005)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        output = log.read_text()
        print("exit status", rc, output[-600:])
        assert rc in (128 + signal.SIGTERM, 0), output
        if rc:
            break
    assert rc == 128 + signal.SIGTERM, "the signal's checkpoint write finished before the second signal, 3 times"
    assert "Stopped at agent step" not in output
    for gen, problem in ckpt.inspect_checkpoints(ckpt_root):
        assert problem is None, problem
    assert snapshot(first) == good  # the generation before the interrupted write is untouched
    trainer = Trainer(cartpole_cfg(root, "train.frames=1000000", "replay.prioritized=true",
                                   "replay.capacity=2000000", "train.replay_start_steps=100"), progress=False)
    try:
        assert trainer.setup() and trainer.counters.agent_step == ckpt.step_of(ckpt.generations(ckpt_root)[0])
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------------------
# The memory check sees cgroup limits (Slurm --mem, containers), not only the node's memory
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_available_memory_respects_the_cgroup_limit(tmp_path, version):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")  # 32 GiB free on the node
    cg = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    if version == "v2":
        d = cg / "slurm" / "job_1"
        d.mkdir(parents=True)
        (d / "memory.max").write_text(f"{4 << 30}\n")
        (d / "memory.current").write_text(f"{1 << 30}\n")
        (d / "memory.stat").write_text(f"anon 1\ninactive_file {256 << 20}\n")
        proc.write_text("0::/slurm/job_1\n")
    else:
        d = cg / "memory"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
        (d / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
        (d / "memory.stat").write_text(f"total_inactive_file {256 << 20}\n")
        proc.write_text("4:memory:/docker/abc\n3:cpu:/docker/abc\n")  # inside a container: mounted at the root
    expected = (4 << 30) - ((1 << 30) - (256 << 20))
    assert available_memory_bytes(str(meminfo), str(cg), str(proc)) == expected
    (d / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).write_text(
        "max\n" if version == "v2" else "9223372036854771712\n")
    assert available_memory_bytes(str(meminfo), str(cg), str(proc)) == 33554432 * 1024  # no limit
