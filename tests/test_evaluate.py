"""Evaluation: which episodes count, the final evaluation's protocol, and re-evaluating a run (python -m
dqn_atari evaluate): which weights it uses, and clear errors for damaged or foreign ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dqn_atari.agent import Agent
from dqn_atari.config import ConfigError, apply_overrides, config_from_dict, deep_merge, read_yaml
from dqn_atari.evaluate import load_run_agent
from dqn_atari.train import Trainer, evaluate, make_eval_env

ROOT = Path(__file__).resolve().parent.parent


def tiny_cartpole_run(tmp_path: Path, *overrides: str) -> Trainer:
    data = deep_merge(read_yaml(ROOT / "configs" / "nature_dqn.yaml"), read_yaml(ROOT / "configs" / "control" / "cartpole.yaml"))
    data = apply_overrides(data, [f"runs_root={tmp_path}", "device=cpu", "train.frames=900", "replay_start_steps=100",
                                  "checkpoint_period_steps=300", "eval.period_steps=100000", "eval.episodes=1",
                                  *overrides])
    return Trainer(config_from_dict(data), progress=False)


def test_unfinished_run_uses_its_newest_intact_checkpoint(tmp_path, capsys):
    run = tiny_cartpole_run(tmp_path).train(interrupt_at_step=700)
    gens = sorted((run.path / "checkpoints").glob("step_*"))
    assert len(gens) >= 2 and not (run.path / "model.safetensors").exists()
    _, agent = load_run_agent(run.path)
    assert gens[-1].name in capsys.readouterr().out

    damaged = gens[-1] / "tensors.safetensors"
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))  # flip the last bytes
    _, older = load_run_agent(run.path)
    assert gens[-2].name in capsys.readouterr().out
    assert any((a != b).any() for a, b in zip(agent.online.state_dict().values(), older.online.state_dict().values()))

    for gen in gens:
        (gen / "tensors.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        load_run_agent(run.path)


def test_damaged_or_foreign_final_weights_are_clear_errors(tmp_path):
    run = tiny_cartpole_run(tmp_path / "a").train()
    model = run.path / "model.safetensors"
    original = model.read_bytes()
    model.write_bytes(original[:100])
    with pytest.raises(ConfigError, match="damaged"):
        load_run_agent(run.path)

    other = tiny_cartpole_run(tmp_path / "b", "network.mlp_hidden=[32, 32]", "train.frames=200").train()
    model.write_bytes((other.path / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="does not hold the weights"):
        load_run_agent(run.path)
    assert model.read_bytes() == (other.path / "model.safetensors").read_bytes()  # refused, left as it was


def cartpole_config(*overrides: str):
    data = deep_merge(read_yaml(ROOT / "configs" / "nature_dqn.yaml"), read_yaml(ROOT / "configs" / "control" / "cartpole.yaml"))
    return config_from_dict(apply_overrides(data, ["device=cpu", *overrides]))


def test_parallel_evaluation_does_not_favour_short_episodes():
    """With 8 envs, the 30 episodes counted are the first 30 to start, not the first 30 to end (which drops
    the long ones still running). Random play on CartPole, where the score is the episode's length: 100
    evaluations on 8 envs and on 1 env give the same mean within 4 standard errors. Counting the first to end
    gave 20.4 against 22.4 here, 7 standard errors apart."""
    means = {}
    for num_envs in (1, 8):
        cfg = cartpole_config("eval.epsilon=1.0", f"eval.num_envs={num_envs}", "eval.episodes=30")
        env = make_eval_env(cfg, 0)
        agent = Agent(cfg, env.obs_shape, env.num_actions)
        env.close()
        scores = [np.asarray(evaluate(agent, cfg, index)) for index in range(100)]
        assert all(s.size == 30 for s in scores)
        scores = np.concatenate(scores)
        means[num_envs] = (scores.mean(), scores.std() / np.sqrt(scores.size))
    (mean_1, se_1), (mean_8, se_8) = means[1], means[8]
    assert abs(mean_8 - mean_1) < 4 * np.hypot(se_1, se_8), means


def test_final_evaluation_plays_every_episode_to_its_end(tmp_path):
    """Periodic evaluations stop at eval.max_steps; the final one (here at the last step of training, where a
    periodic one falls due as well) has no step budget and plays all eval.episodes, as Nature's tables."""
    run = tiny_cartpole_run(tmp_path, "eval.period_steps=300", "eval.max_steps=40", "eval.episodes=5",
                            "eval.epsilon=1.0").train()
    evals = run.eval
    assert list(evals["agent_step"]) == [300, 600, 900]
    assert (evals["num_episodes"].iloc[:-1] < 5).all()
    assert evals["num_episodes"].iloc[-1] == 5


def test_the_step_budget_counts_the_counted_episodes_steps_only():
    """8 envs, 2 episodes counted: the budget is spent by those 2 episodes' steps, as one env would spend it,
    not by all 8 envs' (which would stop this evaluation after 200 / 8 = 25 steps, before either ended)."""
    cfg = cartpole_config("eval.epsilon=1.0", "eval.num_envs=8", "eval.episodes=2", "eval.max_steps=200")
    env = make_eval_env(cfg, 0)
    agent = Agent(cfg, env.obs_shape, env.num_actions)
    env.close()
    scores = evaluate(agent, cfg, 3)
    assert len(scores) == 2 and min(scores) > 25 and sum(scores) <= 200, scores


def test_run_trained_with_cuda_graphs_evaluates_without_a_gpu(tmp_path):
    run = tiny_cartpole_run(tmp_path).train(interrupt_at_step=400)
    config = run.path / "config.yaml"
    assert "cuda_graph: false" in config.read_text()
    config.write_text(config.read_text().replace("cuda_graph: false", "cuda_graph: true"))  # as a GPU run records it
    cfg, agent = load_run_agent(run.path)
    assert not cfg.cuda_graph and agent.device.type == "cpu"


@pytest.mark.parametrize("option, message", [
    ("episodes=0", "episodes must be >= 1"), ("episodes=-3", "episodes must be >= 1"),
    ("seed=-1", "seed must be >= 0"), ("epsilon=1.5", "epsilon is a probability"),
    ("epsilon=nan", "epsilon is a probability"), ("episodes=two", "is not an integer"), ("frames=9", "evaluate takes"),
])
def test_evaluate_command_refuses_bad_options_before_touching_the_run(tmp_path, capsys, option, message):
    from dqn_atari.cli import main

    run = tiny_cartpole_run(tmp_path, "train.frames=300").train()
    before = {p: p.stat().st_mtime_ns for p in run.path.rglob("*")}
    assert main(["evaluate", str(run.path), option]) == 2
    assert message in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.path.rglob("*")} == before


def test_what_evaluate_cannot_do_is_said_before_it_evaluates(tmp_path, capsys, monkeypatch):
    """A video of a control task, or epsilon= for a noisy-net run: a clear error before any episode is played."""
    from dqn_atari import evaluate as evaluate_module
    from dqn_atari.cli import main

    def no_episodes(*_a, **_k):
        raise AssertionError("the run was evaluated before its options were checked")

    plain = tiny_cartpole_run(tmp_path / "plain", "train.frames=300").train()
    noisy = tiny_cartpole_run(tmp_path / "noisy", "train.frames=300", "network.noisy=true").train()
    monkeypatch.setattr(evaluate_module, "evaluate", no_episodes)
    for run, option, message in ((plain, f"video={tmp_path / 'v.mp4'}", "Videos are for Atari runs only"),
                                 (noisy, "epsilon=0.5", "epsilon= does not apply to a noisy-net run")):
        assert main(["evaluate", str(run.path), option]) == 2
        assert message in capsys.readouterr().err

