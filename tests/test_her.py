"""Hindsight experience replay (issue 10): the bit-flipping env, hindsight relabelling against hand-computed goals
and rewards, learning 10-bit flipping with and without HER through the one training loop, and exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dqn_atari.config import ConfigError, load_config
from dqn_atari.envs import BitFlip, env_display_name, is_control_task, make_env
from dqn_atari.replay import HindsightReplayBuffer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "control"
GAMMA = 0.98

# ----------------------------------------------------------------------------------------------------------
# The environment


def test_bitflip_names_carry_the_number_of_bits():
    for name in ("BitFlip10", "bitflip-10", "bitflip_10"):
        env = make_env(name, num_envs=2)
        assert isinstance(env, BitFlip) and env.n_bits == 10 and env.num_actions == 10
        assert env.obs_shape == (1, 20) and env.goal_size == 10
    assert env_display_name("bitflip_7") == "BitFlip7" and is_control_task("BitFlip7")
    with pytest.raises(ValueError, match="BitFlip10"):
        make_env("bitflip")
    with pytest.raises(ValueError, match="n_bits"):
        make_env("BitFlip0")


def test_bitflip_dynamics_rewards_and_episode_length():
    env = make_env("BitFlip4", num_envs=1, seed=5)
    env.reset()
    state = env.state_dict()
    state["backend"] = {"state": [[0, 0, 0, 0]], "goal": [[1, 1, 0, 0]]}  # a chosen start and goal
    env.load_state_dict(state)
    # Flip bit 3 and back (a detour), then bits 0 and 1: the last step lands on the goal.
    expected_states = [[0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    for t, (action, s_next) in enumerate(zip([3, 3, 0, 1], expected_states)):
        obs, reward, terminated, truncated, info = env.step(np.array([action]))
        last = t == 3
        shown = info["final_obs"] if last else obs
        assert shown[0, 0].tolist() == [*s_next, 1, 1, 0, 0]  # action i flips bit i; the goal stays
        assert reward[0] == (0.0 if last else -1.0)  # -[s' != g]
        assert not terminated[0]  # reaching the goal ends nothing (App. A: success at any step)
        assert truncated[0] == last  # episodes last exactly n steps
    assert info["episode_return"][0] == -3.0 and info["episode_length"][0] == 4
    assert env.succeeded(-3.0) and not env.succeeded(-4.0)
    assert obs[0, 0, :4].tolist() != obs[0, 0, 4:].tolist()  # the next episode started, with a fresh goal


def test_bitflip_start_differs_from_goal_and_state_round_trips():
    env = make_env("BitFlip1", num_envs=64, seed=0)  # with one bit a redrawn goal is the only option
    obs, _ = env.reset()
    assert (obs[:, 0, 0] != obs[:, 0, 1]).all()
    env = make_env("BitFlip6", num_envs=3, seed=2)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(8):
        env.step(rng.integers(0, 6, 3))
    twin = make_env("BitFlip6", num_envs=3, seed=99)
    twin.load_state_dict(env.state_dict())
    for _ in range(10):
        actions = rng.integers(0, 6, 3)
        a, b = env.step(actions), twin.step(actions)
        for x, y in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------------------
# Relabelling: one scripted 3-bit episode, goals and rewards written out by hand

S0, S1, S2, S3 = (0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0)  # start, then flip bit 0, bit 1, bit 0
GOAL = (1, 1, 1)  # never reached, so every stored reward is -1
OTHER_START, OTHER_GOAL = (1, 1, 1), (0, 0, 0)  # a second episode, still running: never sampled

# (state s_t of the sampled transition) -> {hindsight goal: reward r(s_t, a_t, goal) = -[s_{t+1} != goal]}
EXPECTED = {
    "final": {S0: {S3: -1.0}, S1: {S3: -1.0}, S2: {S3: 0.0}},
    "future": {S0: {S1: 0.0, S2: -1.0, S3: -1.0}, S1: {S2: 0.0, S3: -1.0}, S2: {S3: 0.0}},
    "episode": {S0: {S0: -1.0, S1: 0.0, S2: -1.0, S3: -1.0},
                S1: {S0: -1.0, S1: -1.0, S2: 0.0, S3: -1.0},
                S2: {S0: -1.0, S1: -1.0, S2: -1.0, S3: 0.0}},
}
NEXT = {S0: S1, S1: S2, S2: S3}


def scripted_buffer(strategy: str, k: int = 4, seed: int = 0) -> HindsightReplayBuffer:
    buf = HindsightReplayBuffer(capacity=64, num_envs=1, frame_shape=(6,), frame_dtype=np.float32, stack=1,
                                discount=GAMMA, seed=seed, strategy=strategy, k=k, goal_size=3, max_episode_steps=3)
    frame = lambda s, g: np.array([[*s, *g]], np.float32)  # noqa: E731
    for t, (s, a) in enumerate(zip((S0, S1, S2), (0, 1, 0))):
        last = t == 2
        buf.add(frame(s, GOAL), [a], [-1.0], [False], [last], frame(S3, GOAL) if last else None)
    # The next episode's first transition is complete (its next state is stored) but its episode is not.
    buf.add(frame(OTHER_START, OTHER_GOAL), [2], [-1.0], [False], [False])
    buf.add(frame((1, 1, 0), OTHER_GOAL), [1], [-1.0], [False], [False])
    assert buf.num_samplable() == 4
    return buf


@pytest.mark.parametrize("strategy", ["final", "future", "episode"])
def test_relabelled_goals_and_rewards_are_the_hand_computed_ones(strategy):
    buf = scripted_buffer(strategy)
    seen: dict[tuple, dict[tuple, float]] = {}
    relabelled = total = 0
    for _ in range(20):
        b = buf.sample(256)
        assert (b.discount_t == np.float32(GAMMA)).all()  # no terminal, even at the episode's last step
        for o_tm1, o_t, r in zip(b.obs_tm1[:, 0], b.obs_t[:, 0], b.reward_t):
            s, g, s_next, g_next = (tuple(int(x) for x in v) for v in (o_tm1[:3], o_tm1[3:], o_t[:3], o_t[3:]))
            assert s in NEXT, f"sampled {s}: a transition of the unfinished episode"
            assert s_next == NEXT[s] and g_next == g  # states are untouched, both observations get the goal
            total += 1
            if g == GOAL:
                assert r == -1.0  # the original goal keeps the env's reward
                continue
            relabelled += 1
            seen.setdefault(s, {})[g] = float(r)
    assert seen == EXPECTED[strategy]  # every expected goal occurs, with its reward, and nothing else
    share = 0.5 if strategy == "final" else 4 / 5  # Algorithm 1: k hindsight copies per original (final: one)
    assert relabelled / total == pytest.approx(share, abs=0.03)


def test_future_relabels_k_over_k_plus_one_of_the_batch():
    for k, share in ((1, 0.5), (8, 8 / 9)):
        buf = scripted_buffer("future", k=k)
        goals = np.concatenate([buf.sample(512).obs_tm1[:, 0, 3:] for _ in range(8)])
        assert (goals != GOAL).any(axis=1).mean() == pytest.approx(share, abs=0.03)


def test_hindsight_buffer_refuses_what_it_cannot_relabel():
    with pytest.raises(ValueError, match="n_step"):
        HindsightReplayBuffer(capacity=64, frame_shape=(6,), frame_dtype=np.float32, stack=1, n_step=3, goal_size=3,
                              max_episode_steps=3)
    with pytest.raises(ValueError, match="shape"):
        HindsightReplayBuffer(capacity=64, frame_shape=(5,), frame_dtype=np.float32, stack=1, goal_size=3,
                              max_episode_steps=3)
    with pytest.raises(ValueError, match="strategy"):
        HindsightReplayBuffer(capacity=64, frame_shape=(6,), frame_dtype=np.float32, stack=1, goal_size=3,
                              max_episode_steps=3, strategy="random")
    buf = HindsightReplayBuffer(capacity=64, frame_shape=(6,), frame_dtype=np.float32, stack=1, goal_size=3,
                                max_episode_steps=3)
    buf.add(np.zeros((1, 6), np.float32), [0], [-1.0], [False], [False])
    buf.add(np.zeros((1, 6), np.float32), [0], [-1.0], [False], [False])
    with pytest.raises(ValueError, match="finished episodes"):
        buf.sample(4)
    with pytest.raises(ConfigError, match="her_strategy"):
        load_config(CONFIGS / "bitflip_her.yaml", ["replay.prioritized=true"])


# ----------------------------------------------------------------------------------------------------------
# Learning through the one training loop, and exact resume


def bitflip_config(tmp_path, variant: str, *overrides: str):
    return load_config(CONFIGS / f"{variant}.yaml", [f"runs_root={tmp_path}", "device=cpu", *overrides])


def success_rates(run, n_bits: int) -> list[float]:
    return [float(np.mean(np.asarray(s) > -n_bits)) for s in run.eval["scores"]]  # BitFlip.succeeded


LEARN_STEPS = 16_000  # 1,600 episodes of 10 bits (each lasts 10 steps), seed 1


@pytest.mark.slow
@pytest.mark.parametrize("variant, overrides, solved", [
    ("bitflip_her", (), True),
    ("bitflip_her", ("agent.double=true",), True),
    ("bitflip_dqn", (), False),
])
def test_her_solves_10_bit_flipping_and_dqn_alone_does_not(tmp_path, variant, overrides, solved):
    """The learning claim of Fig. 1 at n = 10 and one fixed budget: the final greedy test over 100 episodes
    succeeds >= 90 % of the time with hindsight replay (DQN and Double DQN), < 20 % without."""
    from dqn_atari.train import train

    cfg = bitflip_config(tmp_path, variant, "env.game=BitFlip10", "seed=1", f"train.frames={LEARN_STEPS}",
                         "eval.period_steps=4000", *overrides)
    run = train(cfg, progress=False)
    rates = success_rates(run, 10)
    print(f"{variant} {' '.join(overrides)}: success rate every 4,000 steps {rates}")
    assert (run.eval["num_episodes"] == 100).all()
    if solved:
        assert rates[-1] >= 0.9, rates
    else:
        assert max(rates) < 0.2, rates


def test_interrupted_and_resumed_her_run_is_bit_identical(tmp_path):
    """Checkpoints hold all a HER run needs (the relabelling draws come from the replay's saved RNG): stopping
    twice mid-episode and resuming gives the uninterrupted run's logs and weights exactly."""
    from safetensors.numpy import load_file

    from dqn_atari.train import Trainer, train

    settings = ("env.game=BitFlip5", "replay.her_strategy=future", "train.frames=3000", "eval.period_steps=1000",
                "replay.capacity=20000")
    whole = train(bitflip_config(tmp_path / "whole", "bitflip_her", *settings), progress=False)
    parts_cfg = bitflip_config(tmp_path / "parts", "bitflip_her", *settings)
    for stop in (1100, 1650):  # learning has started; 16 envs are mid-episode at both
        assert not Trainer(parts_cfg, progress=False).train(interrupt_at_step=stop).is_done
    parts = train(parts_cfg, progress=False)
    assert parts.is_done
    for name in ("train", "eval"):
        a, b = (getattr(r, name).drop(columns="wall_time") for r in (whole, parts))
        assert len(a) > 0
        assert a.astype(str).equals(b.astype(str)), name
    wa, wb = (load_file(str(r.path / "model.safetensors")) for r in (whole, parts))
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key])


def test_make_her_trains_both_variants_then_writes_the_figure_and_tables(tmp_path, capsys):
    """The `make her` driver end to end at a tiny budget: runs in worker processes, the report from their final
    evaluations, and a second call that finds every run DONE and only rewrites the report."""
    from dqn_atari.her import her_main

    argv = ["--bits", "3", "--seeds", "1", "--episodes", "40", "--workers", "1", "--no-progress",
            "--out", str(tmp_path / "report"), f"runs_root={tmp_path / 'runs'}", "eval.episodes=10"]
    assert her_main(argv) == 0
    table = (tmp_path / "report" / "bitflip.csv").read_text().splitlines()
    assert table[0].startswith("variant,bits,seed,her_strategy")
    assert sorted(row.split(",")[:3] for row in table[1:]) == [["bitflip_dqn", "3", "1"], ["bitflip_her", "3", "1"]]
    md = (tmp_path / "report" / "bitflip.md").read_text()
    assert "| n bits | DQN | DQN+HER | minutes per run |" in md and "HER strategy: final" in md
    assert (tmp_path / "report" / "bitflip.png").stat().st_size > 10_000
    runs = sorted((tmp_path / "runs").glob("*/BitFlip*/seed1/DONE"))
    assert len(runs) == 2
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert her_main(argv) == 0  # all DONE: nothing retrains
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    assert her_main(["--bits", "3", "--episodes", "0", "--no-progress"]) == 2
    assert "episodes" in capsys.readouterr().err
    # Finished runs of another config are not reported under these settings; HER's own settings would reach the
    # DQN baseline too; the experiment's axes are its options.
    assert her_main([*argv, "agent.double=true"]) == 2
    assert "finished run of a different config" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    for override, refused in (("replay.her_strategy=future", "replay.her_strategy"), ("seed=4", "seed")):
        assert her_main([*argv, override]) == 2
        assert f"Remove {refused} from the overrides" in capsys.readouterr().err
