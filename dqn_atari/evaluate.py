"""Evaluate a trained run under its recorded protocol, and record a colour video of the agent playing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from dqn_atari.agent import Agent, resolve_device
from dqn_atari.config import Config, ConfigError, config_from_dict
from dqn_atari.rundir import RunDir
from dqn_atari.train import NO_STEP_BUDGET, evaluate, make_eval_env


def load_run_agent(run_dir: Path) -> tuple[Config, Agent]:
    """The run's config and an agent holding its final weights (or its latest checkpoint's)."""
    run = RunDir(run_dir)
    if not (run.path / "config.yaml").exists():
        what = "no config.yaml" if Path(run_dir).is_dir() else "not a folder"
        raise ConfigError(f"{run_dir} is not a run directory ({what}). Run directories look like "
                          f"results/runs/<variant>/<game>/seed<k>/.")
    cfg = config_from_dict(run.config, where=str(run.path / "config.yaml"))
    # Where it runs now, not where it trained: cuda_graph=true would refuse a machine without a GPU.
    cfg = config_from_dict({**cfg.to_dict(), "device": "auto", "cuda_graph": False})
    env = make_eval_env(cfg, 0)
    agent = Agent(cfg, tuple(env.obs_shape), env.num_actions, resolve_device(cfg.device))
    env.close()
    weights_path = run.path / "model.safetensors"
    if weights_path.exists():
        source, weights = weights_path, _read_weights(weights_path)
    elif run.is_done:
        raise ConfigError(f"{run_dir} is finished but its final weights, {weights_path.name}, are missing (a finished "
                          f"run keeps no checkpoints): restore the file from a copy, or re-train the run.")
    else:
        source, weights = _latest_checkpoint_weights(run.path / "checkpoints", run_dir)
        print(f"{run_dir} is not finished; evaluating its latest checkpoint {source.name}.")
    try:
        agent.online.load_state_dict(weights)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{source} does not hold the weights of the network in {run.path / 'config.yaml'} "
                          f"({first}); was it copied from another run?") from None
    return cfg, agent


def _read_weights(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for a damaged header or body
        raise ConfigError(f"{path} cannot be read ({exc}): it is damaged. Restore it from a copy, or re-train "
                          f"the run (a finished run keeps no checkpoints).") from None


def _latest_checkpoint_weights(ckpt_root: Path, run_dir: Path) -> tuple[Path, dict]:
    """The online network of the newest checkpoint generation that verifies (sha256 manifest), skipping
    damaged ones as a resume would."""
    from dqn_atari.checkpoint import inspect_checkpoints

    problems = []
    for gen, problem in inspect_checkpoints(ckpt_root, deep=False):
        if problem is None:
            tensors = load_file(str(gen / "tensors.safetensors"))
            return gen, {k[len("online."):]: v for k, v in tensors.items() if k.startswith("online.")}
        problems.append(f"{gen.name}: {problem}")
    if problems:
        raise ConfigError(f"{run_dir} has no usable checkpoint: {'; '.join(problems)}")
    raise ConfigError(f"{run_dir} has neither model.safetensors nor a checkpoint: nothing to evaluate yet.")


def evaluate_run(run_dir: Path, episodes: int | None = None, video: str | None = None,
                 epsilon: float | None = None, seed: int = 0) -> list[float]:
    cfg, agent = load_run_agent(run_dir)
    if video:
        _video_protocol(cfg)  # what a video cannot show is said before the evaluation, not after it
    if epsilon is not None and cfg.network.noisy:
        raise ConfigError("epsilon= does not apply to a noisy-net run: it is evaluated greedily with its mean weights "
                          "(README, noisy nets). Leave epsilon= out.")
    if epsilon is not None:
        cfg = config_from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "epsilon": epsilon}})
    episodes = episodes or cfg.eval.episodes
    # Evaluation indices from 1,000,000 on never collide with those used during training.
    scores = evaluate(agent, cfg, 1_000_000 + seed, episodes=episodes, max_steps=NO_STEP_BUDGET, progress=True)
    arr = np.asarray(scores)
    print(f"{len(scores)} episodes, epsilon {0.0 if cfg.network.noisy else cfg.eval.epsilon}: "
          f"mean {arr.mean():.1f}, median {np.median(arr):.1f}, std {arr.std():.1f}, min {arr.min():.1f}, max {arr.max():.1f}")
    if video:
        score = record_video(cfg, agent, Path(video), seed=seed)
        print(f"Video of one episode (score {score:.0f}) written to {video}")
    return scores


def _video_protocol(cfg: Config):
    """The run's Atari protocol, if a video can follow it (ConfigError otherwise)."""
    from dqn_atari.envs import PROTOCOL_FIELDS, get_protocol, is_control_task

    if is_control_task(cfg.env.game):
        raise ConfigError(f"Videos are for Atari runs only; {cfg.env.game} is a control task. Leave video= out.")
    protocol = get_protocol(cfg.env.protocol, **{k: v for k, v in cfg.env.overrides.items() if k in PROTOCOL_FIELDS})
    if (protocol.screen_size, protocol.frame_stack) != (84, 4):
        raise ConfigError(f"The video's pipeline (gymnasium's AtariPreprocessing) feeds the network 84x84 frames in "
                          f"stacks of 4; this run used {protocol.screen_size}x{protocol.screen_size} in stacks of "
                          f"{protocol.frame_stack}. Leave video= out.")
    return protocol


def record_video(cfg: Config, agent: Agent, path: Path, seed: int = 0, max_frames: int | None = None) -> float:
    """One episode in colour at the emulator's full resolution, one video frame per agent step (15 fps).

    The agent sees the usual 84x84 grayscale stack, built here by gymnasium's AtariPreprocessing on an RGB
    rendering env; that pipeline follows the same protocol (no-ops, repeat 4, max of 2 frames, area resize)
    but is not the pixel-exact one used in training (its stack starts with copies of the first frame, not zeros;
    no FIRE at reset), so this is one more episode for watching, not one of the scored ones.
    """
    import ale_py
    import gymnasium as gym
    import imageio.v2 as imageio
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    from dqn_atari.envs import display_name, resolve_game

    protocol = _video_protocol(cfg)
    gym.register_envs(ale_py)
    env = gym.make(f"ALE/{display_name(resolve_game(cfg.env.game))}-v5", frameskip=1, render_mode="rgb_array",
                   repeat_action_probability=protocol.repeat_action_probability,
                   full_action_space=protocol.full_action_space,
                   max_episode_steps=max_frames or cfg.eval.max_episode_frames)
    env = FrameStackObservation(AtariPreprocessing(env, noop_max=protocol.noop_max, frame_skip=protocol.frame_skip,
                                                   screen_size=84, grayscale_obs=True), 4)
    rng = np.random.default_rng(seed)
    epsilon = 0.0 if cfg.network.noisy else cfg.eval.epsilon
    obs, _ = env.reset(seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    score, done = 0.0, False
    agent.online.set_noise(False)
    with imageio.get_writer(str(path), fps=15, macro_block_size=1) as writer:
        while not done:
            writer.append_data(env.render())
            action = agent.act(np.asarray(obs)[None], epsilon, rng=rng)[0]
            obs, reward, terminated, truncated, _ = env.step(int(action))
            score += float(reward)
            done = terminated or truncated
        writer.append_data(env.render())
    env.close()
    return score

