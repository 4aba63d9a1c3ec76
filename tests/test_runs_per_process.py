"""K runs in one process (``seeds=[1,2,3]``): the same runs as training each seed alone, each in its own run
directory, with resume and divergence handled per run.

Tolerance. A K-run process evaluates the K networks as one vmapped call (dqn_atari.agent_group). For the MLP
(CartPole) this is the same arithmetic and the results are bit-identical on this machine; a convolution over
K stacked weight sets is one grouped convolution, which sums in another order, so Atari weights differ in the
last bits of float32 (about 1e-8 absolute after 75 updates here). Weights are therefore compared with
rtol=1e-4, atol=1e-6: far above float32 rounding carried through a few hundred updates, far below any
difference a bug would make (a wrong sample, seed or update changes weights by 1e-3 and more). The logs are
compared exactly: an action or a score that differs fails the test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from dqn_atari import checkpoint as ckpt
from dqn_atari.agent_group import AgentGroup
from dqn_atari.cli import build_config, main
from dqn_atari.train import Trainer, train, train_runs
from same_run import assert_same_run

ROOT = Path(__file__).resolve().parent.parent
CARTPOLE = ROOT / "configs" / "control" / "cartpole.yaml"
NATURE = ROOT / "configs" / "nature_dqn.yaml"
TOLERANCE = dict(rtol=1e-4, atol=1e-6)
RUN_FILES = ("config.yaml", "protocol.json", "train.csv", "eval.csv", "DONE", "model.safetensors")
SMALL = ["device=cpu", "train.frames=1500", "train.replay_start_steps=200", "train.checkpoint_period_steps=300",
         "agent.target_update_steps=100", "eval.period_steps=500", "eval.episodes=2", "eval.num_envs=2",
         "eval.max_steps=300"]
# The switches that carry state across a resume (as in test_reliability.py), with 3 envs per run. Not dueling:
# under vmap its two-stream head sums in another order, so dueling runs match alone runs only within the
# tolerance (1e-5 after 300 updates), and with prioritized replay a last-bit difference in a priority soon
# changes a sampled index, after which the logs part (the runs stay equally valid, not step-for-step equal).
EVERYTHING = ["env.num_envs=3", "agent.double=true", "network.noisy=true", "agent.n_step=3",
              "replay.prioritized=true", "train.update_period_steps=2"]


def cartpole(root: Path, seed: int, *extra: str):
    return build_config(CARTPOLE, [f"runs_root={root}", *SMALL, f"seed={seed}", *extra])


def breakout(root: Path, seed: int):
    return build_config(NATURE, [f"runs_root={root}", "device=cpu", "env.game=Breakout", f"seed={seed}",
                                 "train.frames=1600", "replay.capacity=1000", "train.replay_start_steps=100",
                                 "target_update_steps=100", "epsilon_decay_steps=200", "eval.period_steps=200",
                                 "eval.episodes=1", "eval.max_steps=200", "eval.num_envs=1",
                                 "eval.max_episode_frames=800", "checkpoint_period_steps=250"])


def run_dir(root: Path, seed: int, game: str = "CartPole") -> Path:
    return root / "nature_dqn" / game / f"seed{seed}"


def test_k_cartpole_runs_in_one_process_equal_single_runs(tmp_path):
    seeds = (1, 2, 3)
    for seed in seeds:
        train(cartpole(tmp_path / "alone", seed), progress=False)
    runs = train_runs([cartpole(tmp_path / "together", seed) for seed in seeds], progress=False)
    assert [r.path for r in runs] == [run_dir(tmp_path / "together", s) for s in seeds]
    for seed in seeds:
        path = run_dir(tmp_path / "together", seed)
        assert all((path / name).exists() for name in RUN_FILES) and not (path / "checkpoints").exists()
        assert f"seed: {seed}" in (path / "config.yaml").read_text()
        assert_same_run(run_dir(tmp_path / "alone", seed), path, tolerance=TOLERANCE)
    # Independent runs: different seeds learned different weights.
    w1, w2 = (load_file(str(run_dir(tmp_path / "together", s) / "model.safetensors")) for s in (1, 2))
    assert any(not np.allclose(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("batched", [False, True], ids=["taking_turns", "vmapped"])
def test_k_atari_runs_in_one_process_equal_single_runs(tmp_path, monkeypatch, batched):
    """On CPU the Nature CNN runs take turns (agent_group.batch_runs) and equal the runs alone bit for bit; the
    vmapped path, which GPUs take, is forced here so that it is tested too (within the tolerance)."""
    from dqn_atari import agent_group

    assert not agent_group.batch_runs(breakout(tmp_path, 1), torch.device("cpu"))
    monkeypatch.setattr(agent_group, "batch_runs", lambda cfg, device: batched)
    for seed in (1, 2):
        train(breakout(tmp_path / "alone", seed), progress=False)
    train_runs([breakout(tmp_path / "together", seed) for seed in (1, 2)], progress=False)
    for seed in (1, 2):
        together = run_dir(tmp_path / "together", seed, "Breakout")
        assert all((together / name).exists() for name in RUN_FILES)
        assert_same_run(run_dir(tmp_path / "alone", seed, "Breakout"), together,
                        tolerance=TOLERANCE if batched else None)


def test_every_switch_trains_together_as_alone_and_resumes(tmp_path):
    """Noisy nets (per-run torch streams), double, n-step, prioritized replay and 3 envs per run; the K-run process is interrupted twice, and after the second interrupt one run's
    newest checkpoint is lost (as when a kill lands between the K saves): that run catches up alone, then
    both go on together. Everything equals the runs trained alone, uninterrupted."""
    seeds = (1, 2)
    for seed in seeds:
        train(cartpole(tmp_path / "alone", seed, *EVERYTHING), progress=False)
    parts = [cartpole(tmp_path / "parts", seed, *EVERYTHING) for seed in seeds]
    for stop in (450, 660):
        runs = train_runs(parts, progress=False, interrupt_at_step=stop)
        assert not any(r.is_done for r in runs)
    newest = ckpt.generations(run_dir(tmp_path / "parts", 2) / "checkpoints")
    assert [ckpt.step_of(g) for g in newest] == [660, 600]
    shutil.rmtree(newest[0])
    runs = train_runs(parts, progress=False)
    assert all(r.is_done for r in runs)
    for seed in seeds:
        assert_same_run(run_dir(tmp_path / "alone", seed), run_dir(tmp_path / "parts", seed), tolerance=TOLERANCE)


def test_a_diverging_run_stops_alone_with_a_clear_error(tmp_path, monkeypatch, capsys):
    """One of three runs gets NaN weights: the error names it, its last good checkpoint is kept, and the two
    others train to the end (their results unchanged)."""
    real_update = AgentGroup.update

    def update(self, batches):
        out = real_update(self, batches)
        if self.agents[0].updates == 120 and len(self.agents) == 3:  # agent step 440, after the checkpoint at 300
            with torch.no_grad():
                for p in self.agents[1].online.parameters():
                    p.fill_(float("nan"))
        return out

    monkeypatch.setattr(AgentGroup, "update", update)
    monkeypatch.chdir(ROOT)
    root = tmp_path / "runs"
    rc = main(["train", str(CARTPOLE), f"runs_root={root}", *SMALL, "train.log_period_steps=50", "seeds=[1,2,3]",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 of the runs trained together diverged" in err and "NaN or infinite" in err
    assert f"{run_dir(root, 2)}: The loss became NaN" in err and "step_000000000300" in err
    assert not (run_dir(root, 2) / "DONE").exists()
    gens = ckpt.generations(run_dir(root, 2) / "checkpoints")
    assert [g.name for g in gens] == ["step_000000000300"]
    ckpt.verify_generation(gens[0])
    weights = load_file(str(gens[0] / "tensors.safetensors"))
    assert all(np.isfinite(v).all() for k, v in weights.items() if k.startswith("online."))
    for seed in (1, 3):
        assert (run_dir(root, seed) / "DONE").exists()
        alone = tmp_path / "alone"
        train(cartpole(alone, seed, "train.log_period_steps=50"), progress=False)
        assert_same_run(run_dir(alone, seed), run_dir(root, seed), tolerance=TOLERANCE)


def test_a_run_that_diverges_while_catching_up_does_not_hold_back_the_others(tmp_path, monkeypatch):
    """Seed 2 resumes behind seed 1 and diverges while it trains alone up to it: seed 1 still trains to the end
    (re-running the command is the whole recovery, so one bad seed must not block the rest), then the error
    names seed 2, whose last good checkpoint is kept."""
    from dqn_atari.train import TrainingDiverged

    parts = [cartpole(tmp_path, seed) for seed in (1, 2)]
    train_runs(parts, progress=False, interrupt_at_step=660)
    shutil.rmtree(ckpt.generations(run_dir(tmp_path, 2) / "checkpoints")[0])  # seed 2 now resumes at 600
    real_update, poisoned = AgentGroup.update, []

    def update(self, batches):
        out = real_update(self, batches)
        if len(self.agents) == 1 and not poisoned:  # the first lone update is seed 2's catch-up
            poisoned.append(self.agents[0])
            with torch.no_grad():
                for p in self.agents[0].online.parameters():
                    p.fill_(float("nan"))
        return out

    monkeypatch.setattr(AgentGroup, "update", update)
    with pytest.raises(TrainingDiverged, match=r"1 of the runs trained together diverged.*seed2: The loss became NaN"):
        train_runs(parts, progress=False)
    assert (run_dir(tmp_path, 1) / "DONE").exists() and not (run_dir(tmp_path, 2) / "DONE").exists()
    assert [ckpt.step_of(g) for g in ckpt.generations(run_dir(tmp_path, 2) / "checkpoints")] == [600]


def test_runs_that_cannot_share_a_process_are_refused(tmp_path):
    with pytest.raises(ValueError, match="share every setting but seed and env.game.*agent.lr"):
        train_runs([cartpole(tmp_path, 1), cartpole(tmp_path, 2, "agent.lr=0.005")], progress=False)
    with pytest.raises(ValueError, match="named twice"):
        train_runs([cartpole(tmp_path, 1), cartpole(tmp_path, 1)], progress=False)
    assert not any(tmp_path.iterdir())
