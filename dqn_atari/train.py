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

import math
import os
import random
import signal
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dqn_atari import checkpoint as ckpt
from dqn_atari.agent import Agent, resolve_device
from dqn_atari.agent_group import AgentGroup
from dqn_atari.config import (Config, ConfigError, check_recorded_config, comparable, config_mismatch, flatten_keys,
                              frames_to_steps, identity_differences, recorded_identity)
from dqn_atari.envs import env_display_name, is_control_task, make_env
from dqn_atari.progress import progress_bar
from dqn_atari.replay import HindsightReplayBuffer, PrioritizedReplayBuffer, ReplayBuffer, ReplayCorruptError
from dqn_atari.rundir import RunDir


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept (and other runs of the process go on)."""


class EvaluationStopped(Exception):
    """A stop signal cut an evaluation short; nothing of it was written, and it is played again on resume."""


class RunBusy(RuntimeError):
    """Another process is training this run directory (it holds the run's lock); nothing was touched."""

    exit_status = 75  # EX_TEMPFAIL: try again later. A sweep reports the run as busy, not failed.


TRAIN_LOCK = ".train.lock"


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


def make_train_env(cfg: Config, backend: str = "auto"):
    """The run's training env. ``backend`` (Atari only; the observations are the same either way): "auto" runs
    one env in this thread and several in C++ worker threads; "threaded" always uses the threads, so that the
    envs of K runs trained in one process step in parallel (dqn_atari.envs.emulators)."""
    atari = {"protocol": cfg.env.protocol, "backend": backend} if _is_atari(cfg) else {}
    return make_env(cfg.env.game, num_envs=cfg.env.num_envs, seed=cfg.seed, training=True, **atari,
                    **cfg.env.overrides)


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


NO_STEP_BUDGET = math.inf
"""``evaluate``'s ``max_steps`` for an evaluation that plays all its episodes to their end."""


def evaluate(agent: Agent, cfg: Config, eval_index: int, episodes: int | None = None,
             max_steps: float | None = None, progress: bool = False,
             stopped: Callable[[], bool] | None = None) -> list[float]:
    """Raw game scores of whole evaluation episodes, under the run's protocol with eval.epsilon.

    The ``episodes`` counted are the first ones to *start*, whatever their length: each env's first episode,
    then each time a counted episode ends, that env's next one, until ``episodes`` have started; episodes an
    env plays after that are not counted. Taking the first ones to *end* instead would favour short episodes
    (with 8 envs, the long ones still running when the 30th ends would be dropped), and in most games a
    short episode is a low score. The evaluation ends when every counted episode has ended, or when the
    agent-step budget ``max_steps`` runs out: it counts the steps of counted episodes only (the steps one env
    would take to play them), and counted episodes still running then are dropped, as DeepMind's code drops
    its last one. ``max_steps=None`` is the config's budget. ``progress``: a bar of finished episodes.

    A pure function of the weights and ``eval_index`` (and the config): its own environments, NumPy RNG and
    torch RNG (IQN draws quantile fractions when acting) are seeded from the index, and training's random
    streams are untouched. So an evaluation cut short is simply repeated, with the same scores, after the
    resume: ``stopped`` (the trainer's stop flag) is checked at every step, and when it is set the evaluation
    raises EvaluationStopped, so that a stop signal is honoured within a step, not after minutes of evaluation
    (a Slurm job gets 90 s before its time limit).
    """
    episodes = episodes or cfg.eval.episodes
    max_steps = max_steps or cfg.eval.max_steps
    env = make_eval_env(cfg, eval_index)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xE7A1, eval_index, 1]))
    epsilon = 0.0 if cfg.network.noisy else cfg.eval.epsilon
    scores: list[float] = []
    counted = np.arange(env.num_envs) < episodes  # whether each env's current episode is one of the evaluation's
    started = int(counted.sum())
    obs, _ = env.reset()
    steps = 0
    bar = progress_bar(total=episodes, unit="episode", desc=f"evaluation {eval_index}", leave=False,
                       disable=not progress)
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
                if stopped is not None and stopped():
                    raise EvaluationStopped
                actions = agent.act(obs, epsilon, rng=rng)
                obs, _r, _te, _tr, info = env.step(actions)
                steps += int(counted.sum())
                for i in np.flatnonzero(info["episode_end"]):
                    if counted[i]:
                        scores.append(float(info["episode_return"][i]))
                        bar.update(1)
                    counted[i] = started < episodes
                    started += int(counted[i])
    finally:
        agent.online.set_noise(noise_was_on)
        env.close()
        bar.close()
    return scores


class _StopFlag:
    """First SIGINT/SIGTERM: finish the current agent step (an evaluation running then stops at once and is
    played again on resume), checkpoint, exit with status 0 so that a scheduler or sweep sees a clean stop. Second:
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

    def __init__(self, cfg: Config, progress: bool = True, env_backend: str = "auto"):
        self.cfg = cfg
        self.progress = progress
        self.game = game_of(cfg)
        self.run = RunDir.for_run(cfg.runs_root, cfg.variant, self.game, cfg.seed)
        self.device = resolve_device(cfg.device)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        # Before the env and the replay (7 GB at 1M transitions) are built: a run another process is training, or
        # one recorded with another config, is refused at once. setup() takes the lock and checks again.
        if self.run.path.exists():  # (bad input creates nothing: a new run's directory is made by setup())
            os.close(self._flock())
            self._check_recorded_config()
        self.env = make_train_env(cfg, env_backend)
        try:
            self._build(cfg)
        except BaseException:
            self.env.close()  # its worker threads and emulators; e.g. when the replay does not fit in memory
            raise

    def _build(self, cfg: Config) -> None:
        """Everything of a run that comes after its environment: replay, agent, counters."""
        self.frame_skip = frame_skip_of(self.env)
        self.total_steps = frames_to_steps(cfg.train.frames, self.frame_skip)
        if cfg.train.replay_start_steps >= self.total_steps:
            print(f"warning: train.replay_start_steps ({cfg.train.replay_start_steps:,}) is not below the budget of "
                  f"{self.total_steps:,} agent steps (train.frames={cfg.train.frames:,}): this run will do little or "
                  f"nothing but random play. Lower train.replay_start_steps or raise train.frames.", file=sys.stderr)
        replay_cls, replay_kwargs = replay_kind(cfg, self.env)
        obs_shape = tuple(self.env.obs_shape)
        self.replay = replay_cls(
            capacity=cfg.replay.capacity, num_envs=self.env.num_envs, frame_shape=obs_shape[1:],
            frame_dtype=self.env.obs_dtype, stack=obs_shape[0], n_step=cfg.agent.n_step,
            discount=cfg.agent.discount, seed=int(np.random.SeedSequence([cfg.seed, 0x4E9]).generate_state(1)[0]),
            device=self.device if cfg.replay.on_device else None, channels_last=self.device.type == "cpu",
            **replay_kwargs)
        self.agent = Agent(cfg, obs_shape, self.env.num_actions, self.device)
        # torch's global RNG (network init above; noise resets and IQN's quantile fractions later) is this run's
        # own stream, kept here so that K runs in one process each have theirs (see torch_random).
        self.torch_rng = _torch_rng_state(self.device)
        self.counters = Counters(next_eval_step=cfg.eval.period_steps,
                                 next_checkpoint_step=cfg.train.checkpoint_period_steps)
        self.obs: np.ndarray | None = None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.recent: deque = deque(maxlen=20)
        self.diverged = False  # set by the loop when this run's loss became NaN (it then leaves the others)
        self.writer = None
        self.lock_fd = -1

    @contextmanager
    def torch_random(self):
        """A context in which torch's global RNG is this run's stream; entered only around the calls that draw
        from it (noisy nets and IQN), so other variants never touch it."""
        if not (self.cfg.network.noisy or self.cfg.network.head == "iqn"):
            yield
            return
        _set_torch_rng_state(self.torch_rng, self.device)
        try:
            yield
        finally:
            self.torch_rng = _torch_rng_state(self.device)

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
        tensors.update({f"rng.{k}": v for k, v in self.torch_rng.items()})
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
        recorded = recorded_identity(state.get("config", {}))
        diffs = identity_differences(recorded, self.cfg.run_identity())
        if diffs and not self.cfg.force:
            raise ConfigError(config_mismatch(diffs, gen))
        was, now = recorded.get("agent", {}).get("optimizer"), self.cfg.agent.optimizer
        if was != now:  # the saved optimizer state is another optimizer's: it would fail at the first update
            raise ConfigError(f"force=true cannot resume {gen} with another optimizer (agent.optimizer: recorded "
                              f"{was!r}, now {now!r}): its saved state is {was!r}'s. Resume with "
                              f"agent.optimizer={was}, or start a new run (another seed, variant name or runs_root).")
        try:
            self._load_state(tensors, state, gen)
        except (RuntimeError, ValueError, KeyError) as exc:
            if not diffs or isinstance(exc, ReplayCorruptError) or ckpt.is_out_of_memory(exc):
                raise  # a damaged or foreign checkpoint: load_checkpoint tries the one before
            # Intact, but force=true changed a setting its network or replay was built for: not damage.
            raise ConfigError(f"force=true cannot resume {gen} with {'; '.join(diffs[:8])}: {exc}. The network and "
                              f"replay saved there were built for the recorded values; resume with those, or start "
                              f"a new run (another seed, variant name or runs_root).") from None

    def _load_state(self, tensors: dict[str, torch.Tensor], state: dict, gen: Path) -> None:
        a = self.agent
        a.online.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("online.")})
        a.target.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("target.")})
        opt_state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = v.to(self.device) if v.dim() > 0 else v
        a.optimizer.load_state_dict({"state": opt_state,
                                     "param_groups": groups_as_now(a.optimizer, state["optim_param_groups"])})
        a.reset_graphs()  # the optimizer's state tensors were replaced
        a.updates = state["agent_updates"]
        a.rng.bit_generator.state = state["rng_agent"]
        # A stream the checkpoint lacks (a run saved on CPU, resumed on CUDA: README, device) keeps its fresh state.
        self.torch_rng = {k: tensors.get(f"rng.{k}", v) for k, v in self.torch_rng.items()}
        random.setstate(_to_tuple(state["rng_python"]))
        self.replay.load(gen / "replay")
        self.env.load_state_dict(_from_jsonable(state["env"]))
        self.obs = _from_jsonable(state["obs"])
        self.counters = Counters(**state["counters"])

    # -- the loop -----------------------------------------------------------------------------------------
    def setup(self) -> bool:
        """Create or resume the run directory. Returns False when the run is already DONE (with this config)."""
        run = self.run
        self.lock()
        diffs = self._check_recorded_config()
        if run.is_done:
            print(f"{run.path} is DONE; nothing to do (to train it again, move the run directory aside: its "
                  f"checkpoints were removed when it finished).")
            return False
        gen = self.last_checkpoint = ckpt.load_checkpoint(self.ckpt_root, self._restore)
        if gen is None:
            self._refuse_to_overwrite_lost_progress()
            self.obs, _ = self.env.reset(seed=self.cfg.seed)
            run.truncate_after(-1)
        else:
            print(f"Resuming {run.path} from {gen.name} (agent step {self.counters.agent_step:,}).")
            run.truncate_after(self.counters.agent_step)
        # force=true: the steps kept ran with the recorded config, which config.yaml is about to lose.
        run.forget_config_changes_after(self.counters.agent_step if gen is not None else -1)
        if diffs and gen is not None:
            run.record_config_change(self.counters.agent_step, diffs)
            print(f"force=true: {run.path} goes on from agent step {self.counters.agent_step:,} with "
                  f"{'; '.join(diffs)} (recorded in {run.CONFIG_CHANGES}).")
        run.write_config(self.cfg.to_dict())
        run.write_protocol(self.protocol_record())
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.path / "tb"), purge_step=self.counters.agent_step or None)
        self.recent = deque(self.counters.recent_scores, maxlen=20)
        return True

    def _refuse_to_overwrite_lost_progress(self) -> None:
        """Starting from step 0 rewrites train.csv and eval.csv. That is right after a crash before the first
        checkpoint was complete (the same steps are played again; the evaluation due at that step is written just
        before it), but a run that recorded steps past its first checkpoint has lost its checkpoints (deleted, or
        the run directory copied without them): raise, and keep its records."""
        run = self.run
        recorded = max((int(df["agent_step"].max()) for df in (run.train, run.eval) if len(df)), default=0)
        n = self.cfg.env.num_envs  # agent steps advance by the number of envs: the first checkpoint is at
        first_checkpoint = -(-self.cfg.train.checkpoint_period_steps // n) * n
        if recorded <= first_checkpoint:
            return
        raise ckpt.CheckpointError(
            f"{run.path} recorded training up to agent step {recorded:,}, but {self.ckpt_root} holds no checkpoint: "
            f"they were deleted, or the run directory was copied without them. Starting again from step 0 would "
            f"rewrite its train.csv and eval.csv, so nothing was changed. To resume, put the checkpoints back. "
            f"To train the run again from scratch, move its logs aside first: "
            f"mkdir {run.path / 'old'} && mv {run.path / 'train.csv'} {run.path / 'eval.csv'} {run.path / 'old'}/")

    def protocol_record(self) -> dict:
        protocol = getattr(self.env, "protocol", None)
        record = {
            "name": self.cfg.env.protocol if _is_atari(self.cfg) else self.cfg.env.game,
            "description": getattr(protocol, "description", ""),
            "eval_epsilon": 0.0 if self.cfg.network.noisy else self.cfg.eval.epsilon,
            "eval_episodes": self.cfg.eval.episodes,
            # A control task keeps its env's own time limit (CartPole's 500 steps; env.overrides.max_episode_steps).
            "eval_max_episode_frames": (self.cfg.eval.max_episode_frames if _is_atari(self.cfg)
                                        else getattr(self.env, "max_episode_steps", None)),
            "frame_skip": self.frame_skip,
        }
        if protocol is not None:
            record.update({k: v for k, v in asdict(protocol).items() if k != "description"})
            record["start"] = ("sticky actions" if protocol.repeat_action_probability > 0
                               else "no-op starts" if protocol.noop_max > 0 else "none")
        return record

    # -- the pieces of one agent step (the loop itself is train_together's) ------------------------------------
    def record_step(self, actions: np.ndarray, epsilon: float, step: tuple, started: float) -> None:
        """Store one agent step of this run's envs (``step`` is what env.step returned) and log finished episodes."""
        next_obs, reward, terminated, _trunc, info = step
        self.replay.add(self.obs[:, -1], actions, reward, terminated, info["episode_end"], info["final_obs"][:, -1])
        self.obs = next_obs
        c = self.counters
        c.agent_step += self.env.num_envs
        rows = []
        for i in np.flatnonzero(info["episode_end"]):
            c.episodes += 1
            score = float(info["episode_return"][i])
            self.recent.append(score)
            rows.append({"agent_step": c.agent_step, "frames": c.agent_step * self.frame_skip,
                         "episode": c.episodes, "score": score, "length": int(info["episode_length"][i]),
                         "epsilon": round(epsilon, 6), "wall_time": round(time.perf_counter() - started, 1)})
        if rows:
            self.run.append_train(rows)
            self.writer.add_scalar("train/episode_score", rows[-1]["score"], c.agent_step)

    def updates_due(self) -> int:
        """Updates owed by now: one per update_period_steps agent steps after replay start (for any num_envs)."""
        c, t = self.counters, self.cfg.train
        if c.agent_step < t.replay_start_steps:
            return 0
        return max(0, c.agent_step // t.update_period_steps - t.replay_start_steps // t.update_period_steps)

    def importance_beta(self) -> float:
        """Prioritized replay's importance-sampling exponent now: replay.beta0 at the start, 1 at the end of the run,
        linearly in agent steps (Schaul et al. 2016, Sec. 3.4; Hessel et al. 2018, Table 1)."""
        beta0 = self.cfg.replay.beta0
        return beta0 + (1.0 - beta0) * min(1.0, self.counters.agent_step / self.total_steps)

    def sample(self):
        t = self.cfg.train
        if self.cfg.replay.prioritized:
            return self.replay.sample(t.batch_size, self.importance_beta())
        return self.replay.sample(t.batch_size)

    def updated(self, batch, stats: dict[str, torch.Tensor], priority: torch.Tensor) -> None:
        """Bookkeeping after the agent's update on ``batch``."""
        self.nonfinite |= ~torch.isfinite(stats["loss"])
        self.last_stats = stats
        if self.cfg.replay.prioritized:
            self.check_finite()  # priorities need host values anyway, so this check costs nothing more
            self.replay.update_priorities(batch.indices, priority.detach())
        self.counters.updates += 1

    def sync_target(self) -> None:
        c = self.counters
        while c.target_syncs < c.agent_step // self.cfg.agent.target_update_steps:
            self.agent.sync_target()
            c.target_syncs += 1

    def log(self, epsilon: float) -> None:
        c = self.counters
        if c.agent_step % self.cfg.train.log_period_steps < self.env.num_envs and self.last_stats:
            self.check_finite()
            for k, v in self.last_stats.items():
                self.writer.add_scalar(f"train/{k}", float(v), c.agent_step)
            self.writer.add_scalar("train/epsilon", epsilon, c.agent_step)

    def checkpoint(self, interrupted: bool) -> bool:
        """Checkpoint when one is due (or on an interrupt); True when one was written."""
        c = self.counters
        if not (c.agent_step >= c.next_checkpoint_step or interrupted):
            return False
        if c.agent_step >= c.next_checkpoint_step:
            c.next_checkpoint_step += self.cfg.train.checkpoint_period_steps
        c.recent_scores = list(self.recent)
        self.check_finite()
        self.save()
        return True

    def _check_recorded_config(self) -> list[str]:
        """How this config differs from the one the run directory recorded (none for a new run); a ConfigError
        unless force=true."""
        run = self.run
        if not (run.exists and (run.path / "config.yaml").exists()):
            return []
        return check_recorded_config(run.config, self.cfg, run.path / "config.yaml", run.is_done, self.cfg.force)

    def lock(self) -> None:
        """One process per run directory: an exclusive ``flock`` on <run>/.train.lock until close(). Two trainers
        on one run (a second `make reproduce` while the first still runs) would interleave its CSVs and delete
        each other's checkpoint writes."""
        self.lock_fd = self._flock()

    def _flock(self) -> int:
        """The run's lock file, opened and locked (RunBusy if another process holds it)."""
        import fcntl

        self.run.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run.path / TRAIN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusy(f"{self.run.path} is being trained by another process right now (it holds {TRAIN_LOCK}). "
                          f"Let it finish, or stop it (Ctrl-C, or SIGTERM to its Python process: it checkpoints) and "
                          f"re-run this command to resume.") from None
        return fd

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.env.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1

    def check_finite(self) -> None:
        if bool(self.nonfinite):
            s = {k: float(v) for k, v in self.last_stats.items()}
            raise TrainingDiverged(
                f"{self.run.path}: The loss became NaN or infinite by agent step {self.counters.agent_step:,} (update "
                f"{self.counters.updates:,}): last loss {s.get('loss')}, Q range [{s.get('q_min')}, {s.get('q_max')}]. "
                f"Training stopped without checkpointing; the last good checkpoint "
                f"({getattr(self, 'last_checkpoint', None) or f'none yet in {self.ckpt_root}'}) is kept. The same "
                f"config would diverge again: lower agent.lr (or fix the config) and re-run with force=true to go on "
                f"from that checkpoint, or delete {self.run.path} to start over."
            )

    def run_evaluation(self, final: bool = False, stopped: Callable[[], bool] | None = None) -> list[float]:
        """One evaluation, appended to eval.csv. The ``final`` one, at the end of training, plays all of
        eval.episodes to their end, with no step budget: the score Nature's tables report (Methods: "each game
        30 times for up to 5 min each"); the periodic ones stop at eval.max_steps, as DeepMind's code did.
        ``stopped``: see evaluate (EvaluationStopped, and nothing changed)."""
        c = self.counters
        scores = evaluate(self.agent, self.cfg, c.evaluations, max_steps=NO_STEP_BUDGET if final else None,
                          progress=self.progress, stopped=stopped)
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
        return train_together([self], interrupt_at_step)[0]

    def finish(self) -> None:
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


def groups_as_now(optimizer: torch.optim.Optimizer, saved_groups: list[dict]) -> list[dict]:
    """Saved parameter groups (which parameters each holds) with this process's settings: the config's, equal to
    the recorded ones unless force=true changed one (``agent.lr``, say), which then takes effect; and run-local
    ones such as Adam's ``capturable`` (its step count on the device, set by cuda_graph), so that a run
    checkpointed with CUDA graphs resumes on a CPU, and the other way round."""
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this one "
                         f"{len(optimizer.param_groups)}")
    return [{**saved, **{k: v for k, v in now.items() if k != "params"}}
            for saved, now in zip(saved_groups, optimizer.param_groups)]


def train_together(trainers: list[Trainer], interrupt_at_step: int | None = None) -> list[RunDir]:
    """Train one run, or K runs of one config (different seeds or games) in one process, to the budget (or
    until a signal / ``interrupt_at_step``). Each run writes its own run directory exactly as alone.

    Resuming K runs whose checkpoints are at different steps (a kill between their saves): the ones behind
    first train alone up to the others, then all go on together. One that diverges on the way is left out, as
    in the group, and its error raised when the others stop.
    """
    with _StopFlag() as stop:
        try:
            _check_together(trainers)
            runs = [t for t in trainers if t.setup()]
            lead = max((t.counters.agent_step for t in runs), default=0)
            diverged: list[TrainingDiverged] = []
            for t in runs:
                if t.counters.agent_step < lead:
                    print(f"{t.run.path} resumed at agent step {t.counters.agent_step:,}, behind the other runs "
                          f"({lead:,}): training it alone up to there first.")
                    try:
                        _Lockstep([t], stop).run(lead)
                    except TrainingDiverged as exc:
                        diverged.append(exc)
                    if stop.requested:
                        break
            runs = [t for t in runs if not t.diverged]
            if runs and not stop.requested:
                group = _Lockstep(runs, stop)
                group.diverged = diverged
                group.run(interrupt_at_step)
            raise_diverged(diverged, runs)
        finally:
            for t in trainers:
                t.close()
    return [t.run for t in trainers]


class _Lockstep:
    """The training loop: K >= 1 runs advanced together, one agent step at a time, with one batched network
    evaluation for acting and one batched update per training step (dqn_atari.agent_group). A run whose loss
    becomes NaN leaves the group (its last good checkpoint is kept) and the others go on; its error is raised
    when they stop."""

    def __init__(self, runs: list[Trainer], stop: _StopFlag):
        self.runs, self.stop = list(runs), stop
        self.diverged: list[TrainingDiverged] = []
        self.group = AgentGroup([t.agent for t in self.runs], [t.torch_random for t in self.runs])

    def run(self, interrupt_at_step: int | None) -> bool:
        """Train to the budget and finish the runs (final evaluation, weights, DONE): True. Stopped by a signal or
        at ``interrupt_at_step`` (checkpointed): False. Then raise TrainingDiverged if a run diverged."""
        bar = _training_bar(self.runs)
        try:
            finished = self.steps(bar, interrupt_at_step)
        finally:
            if bar is not None:
                bar.close()
        if finished:
            for t in self.runs:
                t.finish()
        self.raise_diverged()
        return finished

    def evaluate_due(self, t: Trainer, bar) -> None:
        """Run ``t``'s evaluation if one is due at its current step. A stop signal cuts it short: the schedule
        is set back, so the checkpoint that follows is as if it had not started, and the resume plays it first."""
        c = t.counters
        if c.agent_step < c.next_eval_step:
            return
        c.next_eval_step += t.cfg.eval.period_steps
        try:
            scores = t.run_evaluation(final=c.agent_step >= t.total_steps, stopped=lambda: self.stop.requested)
        except EvaluationStopped:
            c.next_eval_step -= t.cfg.eval.period_steps
            return
        if bar is not None:
            bar.write(f"eval seed{t.cfg.seed} {t.game} @ {c.agent_step * t.frame_skip:,} frames: mean "
                      f"{np.mean(scores) if scores else float('nan'):.1f} over {len(scores)} episodes")

    def steps(self, bar, interrupt_at_step: int | None) -> bool:
        started = time.perf_counter() - self.runs[0].counters.wall_time
        for t in self.runs:  # one that a stop signal cut short before this resume
            if t.counters.agent_step > 0:
                self.evaluate_due(t, bar)
        if self.stop.requested:  # ... and cut short again: each run's newest checkpoint is of this step
            print(f"Stopped at agent step {self.runs[0].counters.agent_step:,}; re-run the same command to resume.")
            return False
        while self.runs and self.runs[0].counters.agent_step < self.runs[0].total_steps:
            epsilons = [epsilon_at(t.counters.agent_step, t.cfg) for t in self.runs]
            actions = self.group.act([t.obs for t in self.runs], epsilons)
            for t, a in zip(self.runs, actions):  # K runs' Atari envs step in their C++ threads, all at once
                t.env.step_async(a)
            for t, a, epsilon in zip(self.runs, actions, epsilons):
                t.record_step(a, epsilon, t.env.step_wait(), started)
            self.learn()
            for t, epsilon in zip(self.runs, epsilons):
                t.counters.wall_time = time.perf_counter() - started
                self.guard(t, t.log, epsilon)
            self.leave_diverged()
            if not self.runs:
                break
            step = self.runs[0].counters.agent_step
            if bar is not None:
                bar.update(self.runs[0].env.num_envs * self.runs[0].frame_skip)
                bar.set_postfix(score=f"{np.mean([s for t in self.runs for s in t.recent] or [np.nan]):.1f}",
                                eps=f"{epsilons[0]:.3f}", refresh=False)
            for t in self.runs:
                self.evaluate_due(t, bar)
            interrupted = self.stop.requested or (interrupt_at_step is not None and step >= interrupt_at_step)
            saved = [self.guard(t, t.checkpoint, interrupted) for t in self.runs]
            self.leave_diverged()
            # A signal that arrived during a periodic save: that checkpoint is of this very step.
            if interrupted or (any(saved) and self.stop.requested):
                print(f"Stopped at agent step {step:,}; re-run the same command to resume.")
                return False
        for t in self.runs:
            self.guard(t, t.check_finite)
        self.leave_diverged()
        return True

    def learn(self) -> None:
        """The updates owed by now (the same for every run: they share their schedules), then target syncs."""
        while self.runs and self.runs[0].counters.updates < self.runs[0].updates_due():
            batches = [t.sample() for t in self.runs]
            for t, batch, (stats, priority) in zip(self.runs, batches, self.group.update(batches)):
                self.guard(t, t.updated, batch, stats, priority)
            self.leave_diverged()
        for t in self.runs:
            t.sync_target()

    def guard(self, t: Trainer, fn, *args):
        """Call ``fn``; when it finds run ``t`` diverged, note it (leave_diverged takes the run out)."""
        try:
            return fn(*args)
        except TrainingDiverged as exc:
            self.diverged.append(exc)
            t.diverged = True
            return None

    def leave_diverged(self) -> None:
        if any(t.diverged for t in self.runs):
            self.runs = [t for t in self.runs if not t.diverged]
            if self.runs:
                self.group = AgentGroup([t.agent for t in self.runs], [t.torch_random for t in self.runs])

    def raise_diverged(self) -> None:
        raise_diverged(self.diverged, self.runs)


def raise_diverged(diverged: list[TrainingDiverged], others: list[Trainer]) -> None:
    """Raise the divergence of runs trained together, if any, naming the ``others`` that went on."""
    if len(diverged) == 1 and not others:
        raise diverged[0]
    if diverged:
        names = ", ".join(str(t.run.path) for t in others)
        raise TrainingDiverged(f"{len(diverged)} of the runs trained together diverged; the others ({names}) "
                               f"went on until they stopped. " + " ".join(str(e) for e in diverged))


def _check_together(trainers: list[Trainer]) -> None:
    """K runs in one process share every setting but the seed and the game (one schedule, one network shape)."""
    first = flatten_keys(trainers[0].cfg.run_identity())
    paths = set()
    for t in trainers:
        other = flatten_keys(t.cfg.run_identity())
        diffs = [k for k in sorted(set(first) | set(other)) if k not in ("seed", "env.game")
                 and comparable(first.get(k)) != comparable(other.get(k))]
        if diffs or t.cfg.device != trainers[0].cfg.device:
            raise ConfigError(f"Runs trained in one process must share every setting but seed and env.game; "
                              f"{t.run.path} differs in {', '.join(diffs) or 'device'}. Train them separately.")
        if t.run.path in paths:
            raise ConfigError(f"{t.run.path} is named twice among the runs to train together; give each run its "
                              f"own seed or game.")
        paths.add(t.run.path)
    if len({(tuple(t.env.obs_shape), t.env.num_actions) for t in trainers}) > 1:
        shapes = ", ".join(f"{t.game}: {t.env.num_actions} actions" for t in trainers)
        raise ConfigError(f"Runs trained in one process share one network shape, but the games differ ({shapes}). "
                          f"Group games with the same number of actions (or use protocol machado2018's full "
                          f"18-action set), or train them separately.")


def _training_bar(runs: list[Trainer]):
    first = runs[0]
    if not first.progress:
        return None
    total = first.total_steps * first.frame_skip
    done = first.counters.agent_step * first.frame_skip
    names = sorted({f"{t.game}" for t in runs})
    seeds = ",".join(str(t.cfg.seed) for t in runs)
    desc = f"{first.cfg.variant} {'+'.join(names)} seed{'s' if len(runs) > 1 else ''}{seeds}"
    return progress_bar(total=total, initial=done, unit="frame", unit_scale=True, desc=desc, smoothing=0.05)


def _torch_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_torch_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(v: Any) -> Any:
    return tuple(_to_tuple(x) for x in v) if isinstance(v, list) else v


def train(cfg: Config, progress: bool = True, interrupt_at_step: int | None = None) -> RunDir:
    return Trainer(cfg, progress=progress).train(interrupt_at_step=interrupt_at_step)


def train_runs(cfgs: list[Config], progress: bool = True, interrupt_at_step: int | None = None) -> list[RunDir]:
    """K runs (configs differing only in seed or game) trained in one process; see train_together. With K > 1
    their Atari envs run in C++ worker threads, so that all K step at once."""
    backend = env_backend_for(len(cfgs))
    return train_together([Trainer(cfg, progress=progress, env_backend=backend) for cfg in cfgs], interrupt_at_step)


def env_backend_for(num_runs: int) -> str:
    """The Atari env backend of each of ``num_runs`` runs trained in one process: C++ threads when there are
    several, so that their envs step at once; otherwise the default (one env in-process)."""
    return "threaded" if num_runs > 1 else "auto"
