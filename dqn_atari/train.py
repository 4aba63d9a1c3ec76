"""The training loop, for every variant: act, store, learn every k steps, sync the target, evaluate, log,
checkpoint. Schedules count agent steps; the budget comes in frames and is converted once.

    for each agent step (N environments at a time):
        a_t = epsilon-greedy(Q(s_t))                      epsilon from the step count (noisy nets: 0 after replay start)
        s_t+1, r_t+1, terminal = env.step(a_t)            learning sees clipped rewards, life-loss terminals
        replay.add(s_t, a_t, r_t+1, terminal)
        every update_period_steps after replay_start:     one batch-32 update (replay ratio kept for any N)
        every target_update_steps:                        target <- online
        every eval.period_steps:                          evaluate under the run's protocol (raw scores)
        every checkpoint_period_steps, and on a signal:   checkpoint everything a resume needs
"""

from __future__ import annotations

import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dqn_atari import checkpoint as ckpt
from dqn_atari.agent import Agent, resolve_device
from dqn_atari.config import RUN_LOCAL_KEYS, Config, ConfigError, flatten_keys, frames_to_steps
from dqn_atari.envs import env_display_name, is_control_task, make_env
from dqn_atari.replay import HindsightReplayBuffer, PrioritizedReplayBuffer, ReplayBuffer
from dqn_atari.rundir import RunDir


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Counters:
    """Everything about the loop's progress that a resume must restore."""

    agent_step: int = 0
    updates: int = 0
    target_syncs: int = 0
    episodes: int = 0
    evaluations: int = 0
    next_eval_step: int = 0
    next_checkpoint_step: int = 0
    wall_time: float = 0.0
    recent_scores: list = field(default_factory=list)


def epsilon_at(step: int, cfg: Config) -> float:
    """Linear decay from epsilon_start to epsilon_end over epsilon_decay_steps, counted from replay start
    as in DeepMind's Nature code (NeuralQLearner.lua: ep_endt measured from learn_start).

    Noisy nets explore through their weights and act greedily, epsilon 0 (Fortunato et al. 2018, Sec. 3.1;
    Hessel et al. 2018, Table 1), but only once learning starts: before replay start every variant acts
    uniformly at random (train.replay_start_steps), since the noise is only resampled at updates and a noisy
    net would otherwise fill the replay with one fixed policy."""
    t = cfg.train
    if cfg.network.noisy:
        return 1.0 if step < t.replay_start_steps else 0.0
    progress = max(0, step - t.replay_start_steps) / t.epsilon_decay_steps
    return t.epsilon_end + (t.epsilon_start - t.epsilon_end) * max(0.0, 1.0 - progress)


def frame_skip_of(env) -> int:
    protocol = getattr(env, "protocol", None)
    return int(getattr(protocol, "frame_skip", 1))


def game_of(cfg: Config) -> str:
    return env_display_name(cfg.env.game)


def make_train_env(cfg: Config):
    return make_env(cfg.env.game, num_envs=cfg.env.num_envs, seed=cfg.seed, training=True,
                    **({"protocol": cfg.env.protocol} if _is_atari(cfg) else {}), **cfg.env.overrides)


def make_eval_env(cfg: Config, eval_index: int):
    seed = int(np.random.SeedSequence([cfg.seed, 0xE7A1, eval_index]).generate_state(1)[0] % (2**31))
    extra = {"protocol": cfg.env.protocol, "max_episode_frames": cfg.eval.max_episode_frames} if _is_atari(cfg) else {}
    return make_env(cfg.env.game, num_envs=cfg.eval.num_envs, seed=seed, training=False,
                    **{**cfg.env.overrides, **extra})


def replay_kind(cfg: Config, env) -> tuple[type, dict]:
    """The replay class and its extra arguments: prioritized, hindsight (goal-conditioned envs) or uniform."""
    r = cfg.replay
    if r.prioritized:
        return PrioritizedReplayBuffer, dict(alpha=r.alpha, eps=r.priority_eps)
    if r.her_strategy != "none":
        if not hasattr(env, "goal_size"):
            raise ConfigError(f"replay.her_strategy={r.her_strategy} needs a goal-conditioned env such as BitFlip10; "
                              f"{cfg.env.game} has no goals. Set replay.her_strategy=none.")
        return HindsightReplayBuffer, dict(strategy=r.her_strategy, k=r.her_k, goal_size=env.goal_size,
                                           max_episode_steps=env.max_episode_steps)
    return ReplayBuffer, {}


def _is_atari(cfg: Config) -> bool:
    return not is_control_task(cfg.env.game)


def evaluate(agent: Agent, cfg: Config, eval_index: int, episodes: int | None = None,
             max_steps: int | None = None) -> list[float]:
    """Raw game scores of whole evaluation episodes, under the run's protocol with eval.epsilon.

    A pure function of the weights and ``eval_index`` (and the config): its own environments, NumPy RNG and
    torch RNG (IQN draws quantile fractions when acting) are seeded from the index, and training's random
    streams are untouched. So an evaluation cut short by a kill is simply repeated, with the same scores,
    after the resume; and a SIGINT/SIGTERM arriving during an evaluation is honoured once it completes
    (the trainer checks its stop flag after the evaluation, then checkpoints).
    """
    episodes = episodes or cfg.eval.episodes
    max_steps = max_steps or cfg.eval.max_steps
    env = make_eval_env(cfg, eval_index)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xE7A1, eval_index, 1]))
    epsilon = 0.0 if cfg.network.noisy else cfg.eval.epsilon
    scores: list[float] = []
    obs, _ = env.reset()
    steps = 0
    # Noisy nets are evaluated with their mean weights (noise off), as Dopamine and the common Rainbow
    # implementations do; the training noise is restored afterwards.
    noise_was_on = agent.online.noise_enabled
    agent.online.set_noise(False)
    # IQN samples quantile fractions from torch's global RNG when acting: a forked stream seeded from the
    # index keeps the evaluation a pure function of the weights and leaves training's stream where it was.
    torch_seed = int(np.random.SeedSequence([cfg.seed, 0xE7A1, eval_index, 2]).generate_state(1)[0])
    try:
        with torch.random.fork_rng(devices=[agent.device] if agent.device.type == "cuda" else []):
            torch.manual_seed(torch_seed)
            while len(scores) < episodes and steps < max_steps:
                actions = agent.act(obs, epsilon, rng=rng)
                obs, _r, _te, _tr, info = env.step(actions)
                steps += env.num_envs
                for i in np.flatnonzero(info["episode_end"]):
                    scores.append(float(info["episode_return"][i]))
    finally:
        agent.online.set_noise(noise_was_on)
        env.close()
    return scores[:episodes]


class _StopFlag:
    """First SIGINT/SIGTERM: finish the current agent step (and the evaluation, if one is running: it is
    never cut short), checkpoint, exit with status 0 so that a scheduler or sweep sees a clean stop. Second:
    exit at once with 128 + the signal number, even in the middle of a checkpoint write; that is safe
    because a generation only becomes visible once complete (see dqn_atari.checkpoint), so the previous
    one stays the one a resume uses, and CSV rows past it are dropped on resume."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise SystemExit(128 + signum)
        self.requested = True
        print(f"\nSignal {signal.Signals(signum).name}: checkpointing, then exiting. Send it again to exit now.",
              flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


class Trainer:
    """One run: its environment, replay, agent, run directory and counters."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.game = game_of(cfg)
        self.run = RunDir.for_run(cfg.runs_root, cfg.variant, self.game, cfg.seed)
        self.device = resolve_device(cfg.device)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.env = make_train_env(cfg)
        self.frame_skip = frame_skip_of(self.env)
        self.total_steps = frames_to_steps(cfg.train.frames, self.frame_skip)
        replay_cls, replay_kwargs = replay_kind(cfg, self.env)
        obs_shape = tuple(self.env.obs_shape)
        self.replay = replay_cls(
            capacity=cfg.replay.capacity, num_envs=self.env.num_envs, frame_shape=obs_shape[1:],
            frame_dtype=self.env.obs_dtype, stack=obs_shape[0], n_step=cfg.agent.n_step,
            discount=cfg.agent.discount, seed=int(np.random.SeedSequence([cfg.seed, 0x4E9]).generate_state(1)[0]),
            device=self.device if cfg.replay.on_device else None, **replay_kwargs)
        self.agent = Agent(cfg, obs_shape, self.env.num_actions, self.device)
        self.counters = Counters(next_eval_step=cfg.eval.period_steps,
                                 next_checkpoint_step=cfg.train.checkpoint_period_steps)
        self.obs: np.ndarray | None = None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.writer = None

    # -- checkpointing ----------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run.path / "checkpoints"

    def save(self) -> Path:
        a = self.agent
        tensors = {f"online.{k}": v for k, v in a.online.state_dict().items()}
        tensors.update({f"target.{k}": v for k, v in a.target.state_dict().items()})
        opt = a.optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, value in st.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "config": self.cfg.run_identity(),
            "counters": asdict(self.counters),
            "agent_updates": a.updates,
            "optim_param_groups": opt["param_groups"],
            "rng_agent": a.rng.bit_generator.state,
            "rng_python": _jsonable(random.getstate()),
            "env": _jsonable(self.env.state_dict()),
            "obs": _jsonable(self.obs),
        }
        # The new generation descends from the one this run last saved or resumed from: its replay starts as
        # hard links to that one's (only changed chunks are written), and generations newer than it (left
        # behind when a damaged one was skipped on resume) are removed.
        self.last_checkpoint = ckpt.save_checkpoint(self.ckpt_root, self.counters.agent_step, tensors, state,
                                                    self.replay.save, link_from=getattr(self, "last_checkpoint", None))
        return self.last_checkpoint

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict, gen: Path) -> None:
        a = self.agent
        if state.get("config") != self.cfg.run_identity() and not self.cfg.force:
            raise ConfigError(_config_mismatch(state.get("config", {}), self.cfg.run_identity(), gen))
        a.online.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("online.")})
        a.target.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("target.")})
        opt_state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = v.to(self.device) if v.dim() > 0 else v
        a.optimizer.load_state_dict({"state": opt_state, "param_groups": state["optim_param_groups"]})
        a.updates = state["agent_updates"]
        a.rng.bit_generator.state = state["rng_agent"]
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        random.setstate(_to_tuple(state["rng_python"]))
        self.replay.load(gen / "replay")
        self.env.load_state_dict(_from_jsonable(state["env"]))
        self.obs = _from_jsonable(state["obs"])
        self.counters = Counters(**state["counters"])

    # -- the loop -----------------------------------------------------------------------------------------
    def setup(self) -> bool:
        """Create or resume the run directory. Returns False when the run is already DONE."""
        run = self.run
        if run.is_done:
            print(f"{run.path} is DONE; nothing to do (delete its DONE file to train again).")
            return False
        if run.exists and (run.path / "config.yaml").exists():
            recorded = run.config
            ours = self.cfg.to_dict()
            if _identity(recorded) != _identity(ours) and not self.cfg.force:
                raise ConfigError(_config_mismatch(_identity(recorded), _identity(ours), run.path / "config.yaml"))
        gen = self.last_checkpoint = ckpt.load_checkpoint(self.ckpt_root, self._restore)
        if gen is None:
            self.obs, _ = self.env.reset(seed=self.cfg.seed)
            run.truncate_after(-1)
        else:
            print(f"Resuming {run.path} from {gen.name} (agent step {self.counters.agent_step:,}).")
            run.truncate_after(self.counters.agent_step)
        run.write_config(self.cfg.to_dict())
        run.write_protocol(self.protocol_record())
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.path / "tb"), purge_step=self.counters.agent_step or None)
        return True

    def protocol_record(self) -> dict:
        protocol = getattr(self.env, "protocol", None)
        record = {
            "name": self.cfg.env.protocol if _is_atari(self.cfg) else self.cfg.env.game,
            "description": getattr(protocol, "description", ""),
            "eval_epsilon": 0.0 if self.cfg.network.noisy else self.cfg.eval.epsilon,
            "eval_episodes": self.cfg.eval.episodes,
            "eval_max_episode_frames": self.cfg.eval.max_episode_frames,
            "frame_skip": self.frame_skip,
        }
        if protocol is not None:
            record.update({k: v for k, v in asdict(protocol).items() if k != "description"})
            record["start"] = "sticky actions" if protocol.repeat_action_probability > 0 else "no-op starts"
        return record

    def learn(self) -> None:
        c, t = self.counters, self.cfg.train
        due = max(0, c.agent_step // t.update_period_steps - t.replay_start_steps // t.update_period_steps)
        if c.agent_step < t.replay_start_steps:
            due = 0
        while c.updates < due:
            if self.cfg.replay.prioritized:
                beta = self.cfg.replay.beta0 + (1.0 - self.cfg.replay.beta0) * min(1.0, c.agent_step / self.total_steps)
                batch = self.replay.sample(t.batch_size, beta)
            else:
                batch = self.replay.sample(t.batch_size)
            stats, priority = self.agent.update(batch)
            self.nonfinite |= ~torch.isfinite(stats["loss"])
            self.last_stats = stats
            if self.cfg.replay.prioritized:
                self.check_finite()  # priorities need host values anyway, so this check costs nothing more
                self.replay.update_priorities(batch.indices, priority.detach())
            c.updates += 1
        while c.target_syncs < c.agent_step // self.cfg.agent.target_update_steps:
            self.agent.sync_target()
            c.target_syncs += 1

    def check_finite(self) -> None:
        if bool(self.nonfinite):
            s = {k: float(v) for k, v in self.last_stats.items()}
            raise TrainingDiverged(
                f"The loss became NaN or infinite by agent step {self.counters.agent_step:,} (update "
                f"{self.counters.updates:,}): last loss {s.get('loss')}, Q range [{s.get('q_min')}, {s.get('q_max')}]. "
                f"Training stopped without checkpointing; the last good checkpoint "
                f"({getattr(self, 'last_checkpoint', None) or f'none yet in {self.ckpt_root}'}) is kept. The same "
                f"config would diverge again: lower agent.lr (or fix the config) and re-run with force=true to go on "
                f"from that checkpoint, or delete {self.run.path} to start over."
            )

    def run_evaluation(self, final: bool = False) -> list[float]:
        c = self.counters
        scores = evaluate(self.agent, self.cfg, c.evaluations)
        c.evaluations += 1
        arr = np.asarray(scores, dtype=np.float64)
        row = {"agent_step": c.agent_step, "frames": c.agent_step * self.frame_skip,
               "mean_score": float(arr.mean()) if arr.size else float("nan"),
               "median_score": float(np.median(arr)) if arr.size else float("nan"),
               "std_score": float(arr.std()) if arr.size else float("nan"),
               "num_episodes": int(arr.size), "scores": scores, "wall_time": round(c.wall_time, 1)}
        self.run.append_eval(row)
        if self.writer is not None and arr.size:
            self.writer.add_scalar("eval/mean_score", row["mean_score"], c.agent_step)
        return scores

    def train(self, interrupt_at_step: int | None = None) -> RunDir:
        """Train to the budget (or until a signal / ``interrupt_at_step``), checkpointing on the way."""
        if not self.setup():
            return self.run
        c, cfg = self.counters, self.cfg
        n = self.env.num_envs
        recent = deque(c.recent_scores, maxlen=20)
        bar = _progress_bar(self, enabled=self.progress)
        started = time.perf_counter() - c.wall_time
        with _StopFlag() as stop:
            try:
                while c.agent_step < self.total_steps:
                    epsilon = epsilon_at(c.agent_step, cfg)
                    actions = self.agent.act(self.obs, epsilon)
                    next_obs, reward, terminated, _trunc, info = self.env.step(actions)
                    self.replay.add(self.obs[:, -1], actions, reward, terminated, info["episode_end"],
                                    info["final_obs"][:, -1])
                    self.obs = next_obs
                    c.agent_step += n
                    rows = []
                    for i in np.flatnonzero(info["episode_end"]):
                        c.episodes += 1
                        score = float(info["episode_return"][i])
                        recent.append(score)
                        rows.append({"agent_step": c.agent_step, "frames": c.agent_step * self.frame_skip,
                                     "episode": c.episodes, "score": score, "length": int(info["episode_length"][i]),
                                     "epsilon": round(epsilon, 6), "wall_time": round(time.perf_counter() - started, 1)})
                    if rows:
                        self.run.append_train(rows)
                        self.writer.add_scalar("train/episode_score", rows[-1]["score"], c.agent_step)
                    self.learn()
                    c.wall_time = time.perf_counter() - started
                    if c.agent_step % cfg.train.log_period_steps < n and self.last_stats:
                        self.check_finite()
                        for k, v in self.last_stats.items():
                            self.writer.add_scalar(f"train/{k}", float(v), c.agent_step)
                        self.writer.add_scalar("train/epsilon", epsilon, c.agent_step)
                    if bar is not None:
                        bar.update(n * self.frame_skip)
                        if rows:
                            bar.set_postfix(score=f"{np.mean(recent):.1f}", eps=f"{epsilon:.3f}", refresh=False)
                    if c.agent_step >= c.next_eval_step:
                        c.next_eval_step += cfg.eval.period_steps
                        scores = self.run_evaluation()
                        if bar is not None:
                            bar.write(f"eval @ {c.agent_step * self.frame_skip:,} frames: mean {np.mean(scores) if scores else float('nan'):.1f} over {len(scores)} episodes")
                    interrupted = stop.requested or (interrupt_at_step is not None and c.agent_step >= interrupt_at_step)
                    saved = False
                    if c.agent_step >= c.next_checkpoint_step or interrupted:
                        if c.agent_step >= c.next_checkpoint_step:
                            c.next_checkpoint_step += cfg.train.checkpoint_period_steps
                        c.recent_scores = list(recent)
                        self.check_finite()
                        self.save()
                        saved = True
                    # A signal that arrived during a periodic save: that checkpoint is of this very step.
                    if interrupted or (saved and stop.requested):
                        print(f"Stopped at agent step {c.agent_step:,}; re-run the same command to resume.")
                        return self.run
                self.check_finite()
                self.finish(recent)
            finally:
                if bar is not None:
                    bar.close()
                if self.writer is not None:
                    self.writer.close()
                self.env.close()
        return self.run

    def finish(self, recent) -> None:
        """Final evaluation, final weights, DONE marker; then the checkpoints (the replay) are removed."""
        from safetensors.torch import save_file
        import shutil

        c = self.counters
        evals = self.run.eval
        if evals.empty or int(evals["agent_step"].iloc[-1]) != c.agent_step:
            self.run_evaluation(final=True)
        evals = self.run.eval
        save_file({k: v.detach().cpu().contiguous() for k, v in self.agent.online.state_dict().items()},
                  str(self.run.path / "model.safetensors"))
        summary = {
            "agent_steps": c.agent_step, "frames": c.agent_step * self.frame_skip, "updates": c.updates,
            "episodes": c.episodes, "wall_time_s": round(c.wall_time, 1),
            "final_eval_mean": float(evals["mean_score"].iloc[-1]),
            "best_eval_mean": float(evals["mean_score"].max()),
        }
        self.run.mark_done(summary)
        shutil.rmtree(self.ckpt_root, ignore_errors=True)
        print(f"Done: {self.run.path} (final evaluation mean {summary['final_eval_mean']:.1f}).")


def _progress_bar(trainer: Trainer, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = trainer.total_steps * trainer.frame_skip
    done = trainer.counters.agent_step * trainer.frame_skip
    return tqdm(total=total, initial=done, unit="frame", unit_scale=True, dynamic_ncols=True,
                desc=f"{trainer.cfg.variant} {trainer.game} seed{trainer.cfg.seed}", smoothing=0.05)


def _identity(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in RUN_LOCAL_KEYS}


def _config_mismatch(recorded: dict, ours: dict, where: Path) -> str:
    a, b = flatten_keys(recorded), flatten_keys(ours)
    diffs = [f"{k}: recorded {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if _norm(a.get(k)) != _norm(b.get(k))]
    return (f"This run directory was started with a different config ({where}): {'; '.join(diffs[:8])}. "
            f"Resuming would silently change the run. Use the original settings, choose another variant name "
            f"or seed, or pass force=true to resume anyway.")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _to_tuple(v: Any) -> Any:
    return tuple(_to_tuple(x) for x in v) if isinstance(v, list) else v


def train(cfg: Config, progress: bool = True, interrupt_at_step: int | None = None) -> RunDir:
    return Trainer(cfg, progress=progress).train(interrupt_at_step=interrupt_at_step)
