"""Run configuration: frozen dataclasses filled from a YAML file plus ``key=value`` overrides.

Every schedule counts *agent steps* (one agent step = ``frame_skip`` = 4 emulator frames under the Nature
protocol) and says so in its name. The training budget is the one number given in frames, as papers report
it; :func:`frames_to_steps` is the single place where frames become agent steps.

A config file mirrors the dataclasses::

    variant: nature_dqn
    env: {game: Breakout, protocol: nature2015}
    agent: {lr: 0.00025, ...}

Overrides on the command line name a field by its dotted path (``agent.lr=1e-4``) or, when unambiguous,
by its bare name (``lr=1e-4``). Unknown keys are errors that name the closest valid key; values are
type-checked and range-checked, and the error says what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message says what to change."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class EnvConfig:
    game: str = "Breakout"
    """Game name in any common spelling (Breakout, ALE/Breakout-v5, space_invaders), or CartPole / Maze."""
    protocol: str = "nature2015"
    """Named Atari protocol preset (nature2015: Mnih et al. 2015; machado2018: sticky actions)."""
    num_envs: int = 1
    """Environments stepped in parallel by one run. 1 is the faithful Nature setting."""
    overrides: dict = field(default_factory=dict)
    """Protocol fields to change, e.g. {repeat_action_probability: 0.25}; checked by the env module."""

    def __post_init__(self) -> None:
        _check(self.num_envs >= 1, f"env.num_envs must be >= 1, got {self.num_envs}.")
        reserved = sorted(set(self.overrides) & {"game", "protocol", "num_envs", "seed", "training", "backend"})
        _check(not reserved, f"env.overrides cannot set {', '.join(reserved)}: use the config keys env.game, "
                             f"env.protocol, env.num_envs and seed (the run sets training and backend itself).")


@dataclass(frozen=True)
class NetworkConfig:
    torso: str = "nature_cnn"
    """nature_cnn (Mnih et al. 2015) for Atari, mlp for the small control tasks."""
    mlp_hidden: tuple = (128, 128)
    """Hidden layer sizes of the MLP torso."""
    head: str = "q"
    """q (expected values), c51 (Bellemare et al. 2017), qr (Dabney et al. 2018a), iqn (Dabney et al. 2018b)."""
    dueling: bool = False
    """Dueling value/advantage streams (Wang et al. 2016)."""
    noisy: bool = False
    """Factorised Gaussian noisy linear layers in the head (Fortunato et al. 2018); replaces epsilon-greedy."""
    noisy_sigma0: float = 0.5
    """Initial noise scale sigma_0 of noisy layers (Fortunato et al. 2018, Sec. 3.2)."""
    hidden: int = 512
    """Units of the head's hidden fully connected layer (Nature: 512)."""
    num_atoms: int = 51
    """C51 atoms (Bellemare et al. 2017: 51)."""
    v_min: float = -10.0
    """Lowest C51 atom."""
    v_max: float = 10.0
    """Highest C51 atom."""
    num_quantiles: int = 200
    """QR-DQN quantiles (Dabney et al. 2018a: 200)."""
    iqn_embedding_dim: int = 64
    """IQN cosine embedding size (Dabney et al. 2018b: 64)."""
    iqn_num_taus_act: int = 32
    """IQN taus sampled when acting (K = 32)."""
    iqn_num_taus: int = 64
    """IQN taus for the online distribution in the loss (N = 64)."""
    iqn_num_taus_target: int = 64
    """IQN taus for the target distribution in the loss (N' = 64)."""
    kappa: float = 1.0
    """Quantile Huber threshold (QR-DQN and IQN: 1)."""

    def __post_init__(self) -> None:
        _check(self.torso in ("nature_cnn", "mlp"), f"network.torso must be nature_cnn or mlp, got {self.torso!r}.")
        _check(self.head in ("q", "c51", "qr", "iqn"), f"network.head must be q, c51, qr or iqn, got {self.head!r}.")
        _check(self.num_atoms >= 2, f"network.num_atoms must be at least 2, got {self.num_atoms}.")
        _check(self.v_min < self.v_max, f"network.v_min ({self.v_min}) must be below network.v_max ({self.v_max}).")
        _check(self.num_quantiles >= 1, f"network.num_quantiles must be >= 1, got {self.num_quantiles}.")
        _check(self.hidden >= 1, f"network.hidden must be >= 1, got {self.hidden}.")
        _check(len(self.mlp_hidden) >= 1 and all(int(n) >= 1 for n in self.mlp_hidden),
               f"network.mlp_hidden must be a non-empty list of positive sizes, got {list(self.mlp_hidden)}.")
        _check(self.noisy_sigma0 >= 0, f"network.noisy_sigma0 must be >= 0, got {self.noisy_sigma0}.")
        _check(self.kappa > 0, f"network.kappa must be > 0, got {self.kappa}.")
        for name in ("iqn_embedding_dim", "iqn_num_taus_act", "iqn_num_taus", "iqn_num_taus_target"):
            _check(getattr(self, name) >= 1, f"network.{name} must be >= 1, got {getattr(self, name)}.")


@dataclass(frozen=True)
class AgentConfig:
    discount: float = 0.99
    """Discount gamma (Nature 2015, Ext. Data Table 1)."""
    n_step: int = 1
    """Steps of the multi-step return (1 = one-step Q-learning)."""
    double: bool = False
    """Double Q-learning targets (van Hasselt et al. 2016)."""
    optimizer: str = "rmsprop_nature"
    """rmsprop_nature (the centered RMSProp of DeepMind's code, eps under the root) or adam."""
    lr: float = 0.00025
    """Learning rate (Nature: 0.00025)."""
    rms_decay: float = 0.95
    """RMSProp gradient and squared-gradient momentum (Nature: 0.95 both)."""
    rms_eps: float = 0.01
    """RMSProp min squared gradient, added under the square root (Nature: 0.01)."""
    adam_eps: float = 1.5e-4
    """Adam epsilon (Rainbow: 1.5e-4)."""
    loss_reduction: str = "sum"
    """sum or mean of per-sample losses over the batch. DeepMind's Nature code backpropagates the sum."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm to this (0 = off; Dueling: 10)."""
    target_update_steps: int = 10_000
    """Agent steps between hard target-network copies (Nature: 10,000)."""
    target_tau: float = 1.0
    """Polyak factor applied at each target update; 1.0 is a hard copy (Nature)."""

    def __post_init__(self) -> None:
        _check(0.0 < self.discount <= 1.0, f"agent.discount must be in (0, 1], got {self.discount}.")
        _check(self.n_step >= 1, f"agent.n_step must be >= 1, got {self.n_step}.")
        _check(self.optimizer in ("rmsprop_nature", "adam"),
               f"agent.optimizer must be rmsprop_nature or adam, got {self.optimizer!r}.")
        _check(self.lr > 0, f"agent.lr must be positive, got {self.lr}.")
        _check(0.0 <= self.rms_decay < 1.0, f"agent.rms_decay must be in [0, 1), got {self.rms_decay}.")
        _check(self.rms_eps > 0 and self.adam_eps > 0, "agent.rms_eps and agent.adam_eps must be positive.")
        _check(self.loss_reduction in ("sum", "mean"), f"agent.loss_reduction must be sum or mean, got {self.loss_reduction!r}.")
        _check(self.max_grad_norm >= 0, f"agent.max_grad_norm must be >= 0, got {self.max_grad_norm}.")
        _check(self.target_update_steps >= 1, f"agent.target_update_steps must be >= 1, got {self.target_update_steps}.")
        _check(0.0 < self.target_tau <= 1.0, f"agent.target_tau must be in (0, 1], got {self.target_tau}.")


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int = 1_000_000
    """Transitions kept (Nature: 1,000,000)."""
    prioritized: bool = False
    """Proportional prioritized replay (Schaul et al. 2016)."""
    alpha: float = 0.6
    """Priority exponent (Schaul et al. 2016, proportional: 0.6; Rainbow: 0.5)."""
    beta0: float = 0.4
    """Initial importance-sampling exponent, annealed linearly to 1 over the run (Schaul et al. 2016: 0.4)."""
    priority_eps: float = 1e-6
    """Added to |delta| so no transition has zero priority."""
    on_device: bool = False
    """Keep the frame store on the training device (GPU fast path); same semantics."""
    her_strategy: str = "none"
    """Hindsight experience replay for goal-conditioned tasks (Andrychowicz et al. 2017): none, final, future, episode."""
    her_k: int = 4
    """HER: relabelled goals per original transition for future and episode (paper: k = 4); final uses one."""

    def __post_init__(self) -> None:
        _check(self.capacity >= 1, f"replay.capacity must be >= 1, got {self.capacity}.")
        _check(self.her_strategy in ("none", "final", "future", "episode"),
               f"replay.her_strategy must be none, final, future or episode, got {self.her_strategy!r}.")
        _check(self.her_k >= 1, f"replay.her_k must be >= 1, got {self.her_k}.")
        _check(self.her_strategy == "none" or not (self.prioritized or self.on_device),
               "replay.her_strategy works with uniform replay in host memory: set replay.prioritized=false and "
               "replay.on_device=false, or replay.her_strategy=none.")
        _check(0.0 <= self.alpha <= 1.0, f"replay.alpha must be in [0, 1], got {self.alpha}.")
        _check(0.0 <= self.beta0 <= 1.0, f"replay.beta0 must be in [0, 1], got {self.beta0}.")
        _check(self.priority_eps > 0, f"replay.priority_eps must be positive, got {self.priority_eps}.")


@dataclass(frozen=True)
class TrainConfig:
    frames: int = 200_000_000
    """Training budget in emulator frames (Nature: 200M = the paper's "50 million frames", which count agent steps).
    Converted to agent steps by frames_to_steps."""
    batch_size: int = 32
    """Minibatch size (Nature: 32)."""
    update_period_steps: int = 4
    """Agent steps between updates (Nature: 4); replay ratio = batch_size / update_period_steps per step."""
    replay_start_steps: int = 50_000
    """Agent steps of uniform-random acting before learning starts (Nature: 50,000)."""
    epsilon_start: float = 1.0
    """Initial exploration epsilon (Nature: 1.0)."""
    epsilon_end: float = 0.1
    """Final exploration epsilon (Nature: 0.1)."""
    epsilon_decay_steps: int = 1_000_000
    """Agent steps of the linear epsilon decay, counted from replay start as in DeepMind's code (Nature: 1M)."""
    checkpoint_period_steps: int = 250_000
    """Agent steps between checkpoints (also written on SIGINT/SIGTERM)."""
    log_period_steps: int = 10_000
    """Agent steps between TensorBoard scalar writes of the training loss and Q values."""

    def __post_init__(self) -> None:
        _check(self.frames >= 1, f"train.frames must be >= 1, got {self.frames}.")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}.")
        _check(self.update_period_steps >= 1, f"train.update_period_steps must be >= 1, got {self.update_period_steps}.")
        _check(self.replay_start_steps >= 0, f"train.replay_start_steps must be >= 0, got {self.replay_start_steps}.")
        for name in ("epsilon_start", "epsilon_end"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"train.{name} must be in [0, 1], got {getattr(self, name)}.")
        _check(self.epsilon_decay_steps >= 1, f"train.epsilon_decay_steps must be >= 1, got {self.epsilon_decay_steps}.")
        _check(self.checkpoint_period_steps >= 1, "train.checkpoint_period_steps must be >= 1.")
        _check(self.log_period_steps >= 1, "train.log_period_steps must be >= 1.")


@dataclass(frozen=True)
class EvalConfig:
    period_steps: int = 250_000
    """Agent steps between evaluations (DeepMind's run_gpu: eval_freq 250,000)."""
    epsilon: float = 0.05
    """Evaluation epsilon (Nature 2015, Methods: 0.05)."""
    episodes: int = 30
    """Evaluation episodes (Nature 2015, Methods: 30)."""
    max_steps: int = 125_000
    """Agent-step budget of one periodic evaluation; episodes unfinished when it runs out are dropped (DeepMind's
    code: 125,000). The final evaluation has none: it plays all ``episodes`` to their end (Nature 2015, Methods)."""
    max_episode_frames: int | None = None
    """Episode cap in evaluation, in frames (Atari; a control task keeps its env's own time limit, e.g. CartPole's
    500 steps, set by env.overrides.max_episode_steps, which protocol.json records). None (the default): the cap of
    ``env.protocol``'s evaluation, :data:`EVAL_EPISODE_FRAMES` (nature2015: 18,000; machado2018: 108,000); the
    resolved number is what the run's config.yaml records."""
    num_envs: int = 8
    """Evaluation environments stepped together, for speed: the episodes counted are the first ``episodes`` to
    start, whatever their length, and the step budget counts their steps only (see dqn_atari.train.evaluate)."""

    def __post_init__(self) -> None:
        _check(self.period_steps >= 1, f"eval.period_steps must be >= 1, got {self.period_steps}.")
        _check(0.0 <= self.epsilon <= 1.0, f"eval.epsilon must be in [0, 1], got {self.epsilon}.")
        _check(self.episodes >= 1, f"eval.episodes must be >= 1, got {self.episodes}.")
        _check(self.max_steps >= 1, f"eval.max_steps must be >= 1, got {self.max_steps}.")
        _check(self.max_episode_frames is None or self.max_episode_frames >= 1,
               f"eval.max_episode_frames must be >= 1 (or null: the protocol's), got {self.max_episode_frames}.")
        _check(self.num_envs >= 1, f"eval.num_envs must be >= 1, got {self.num_envs}.")


# Where and how a run executes, not what it computes: free to change between a run and its resume.
RUN_LOCAL_KEYS = ("runs_root", "device", "force", "torch_threads", "compile", "cuda_graph")


#: Evaluation episode caps of the named protocols, in frames (``eval.max_episode_frames: null`` takes these). Nature
#: 2015 (Methods) evaluates "for up to 5 min" = 18,000 frames at 60 Hz; Machado et al. 2018 and Dopamine cap every
#: episode, evaluation too, at 108,000 frames (27,000 agent steps).
EVAL_EPISODE_FRAMES = {"nature2015": 18_000, "machado2018": 108_000}


@dataclass(frozen=True)
class Config:
    variant: str = "nature_dqn"
    """Name of the variant; the run directory is <runs_root>/<variant>/<game>/seed<seed>."""
    seed: int = 1
    """Seed of every random stream of the run (Python, NumPy, torch, environments, replay)."""
    runs_root: str = "results/runs"
    """Where run directories are created."""
    device: str = "auto"
    """Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    force: bool = False
    """Resume a run directory even though its recorded config differs from this one."""
    torch_threads: int = 0
    """Intra-op CPU threads for torch (0: torch's default). 1 avoids thread thrashing on small CPUs."""
    compile: bool = False
    """Run the learning update (loss, backward, optimizer step) and the greedy action through torch.compile. Same
    algorithm, same batches; floats agree with eager mode to rounding only. Costs ~20 s of compiling at the start
    of a process (~4 s once it is in inductor's disk cache), a few seconds more when the greedy action first meets a
    new batch size or noise switch (evaluation), and, on CPU, needs a C++ compiler. See README, Speed."""
    cuda_graph: bool = False
    """CUDA only: run the update and the greedy action (for K runs in one process, their batched ones) as
    captured CUDA graphs (dqn_atari.cuda_graphs), which skips Python's ~120 kernel launches per update. The
    same kernels; not yet for noisy nets or IQN, nor with compile=true. Not yet run on a GPU (README, Speed)."""
    env: EnvConfig = field(default_factory=EnvConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.eval.max_episode_frames is None:
            cap = EVAL_EPISODE_FRAMES.get(self.env.protocol, EVAL_EPISODE_FRAMES["nature2015"])
            object.__setattr__(self, "eval", dataclasses.replace(self.eval, max_episode_frames=cap))
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device) is not None,
               f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}.")
        _check(self.torch_threads >= 0, f"torch_threads must be >= 0 (0: torch's default), got {self.torch_threads}.")
        _check(re.fullmatch(r"[\w.+-]+", self.variant) is not None,
               f"variant names the run's folder: letters, digits and . _ + - only, got {self.variant!r}.")
        _check(self.runs_root != "", "runs_root must name a folder, got an empty string.")
        _check(0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}.")
        if self.cuda_graph:
            _check(not self.compile, "cuda_graph=true and compile=true do not go together: choose one.")
            # Noisy nets switch their noise off to evaluate (a Python branch a graph would freeze), and IQN draws
            # its quantile fractions inside the network.
            _check(not self.network.noisy and self.network.head != "iqn",
                   f"cuda_graph=true does not support noisy nets or IQN yet (network.noisy={self.network.noisy}, "
                   f"network.head={self.network.head}): set cuda_graph=false.")

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def run_identity(self) -> dict:
        """The fields that define the run: everything except where it is stored and on which device."""
        d = self.to_dict()
        for key in RUN_LOCAL_KEYS:
            d.pop(key)
        return d


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def frames_to_steps(frames: int, frame_skip: int = 4) -> int:
    """The one place where emulator frames become agent steps (Nature: one agent step = 4 frames)."""
    return int(frames) // int(frame_skip)


# ----------------------------------------------------------------------------------------------------------
# Building a Config from nested dicts, YAML files and overrides


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    leaf_close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=3, cutoff=0.6)
    hint = close or [v for v in valid if v.split(".")[-1] in leaf_close]
    suggestion = f" Did you mean {' or '.join(repr(h) for h in hint[:3])}?" if hint else ""
    return ConfigError(f"Unknown config key {key!r} in {where}.{suggestion} "
                       f"Valid keys are listed by `python -m dqn_atari train --help`.")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``, converting strings and int-valued floats."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        if isinstance(value, str):
            number = _count(value)
            if number is None:
                raise ConfigError(f"{key} must be an integer like 1000000, 1e6 or 1M, got {value!r}.")
            value = number
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}.") from None
        if math.isinf(number):  # NaN is left to each field's range check, which names the range
            raise ConfigError(f"{key} must be a finite number, got {value!r}.")
        return number
    if tp is str:
        # YAML reads a blank value as null and on/off/yes/no as booleans: "None" or "True" is never meant.
        if value is None or isinstance(value, (bool, dict, list)):
            raise ConfigError(f"{key} must be a string, got {'nothing' if value is None else repr(value)}"
                              f"{' (quote it)' if isinstance(value, bool) else ''}.")
        return str(value)
    if tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, int, key) for v in value)
        raise ConfigError(f"{key} must be a list such as [128, 128], got {value!r}.")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key} must be a mapping such as {{name: value}}, got {value!r}.")
    if origin in (typing.Union, types.UnionType):  # X | None: null, or a value checked as X
        members = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None and len(members) < len(typing.get_args(tp)):
            return None
        return _coerce(value, members[0], key) if len(members) == 1 else value
    return value


def _build(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} in {where} must be a mapping, got {data!r}.")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(prefix + key, _all_keys(), where)
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, where, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "the config") -> Config:
    return _build(Config, data, where)


def recorded_identity(recorded: dict) -> dict:
    """The run identity of a config recorded by a run, possibly by an older version of this code.

    Fields added since then take their defaults: a new field must default to the behaviour the code had
    before it existed, so an old run resumes as the same run. A recorded config that no longer parses
    (a field was removed or renamed) is compared as written, which reports the difference."""
    try:
        return config_from_dict(recorded).run_identity()
    except ConfigError:
        return {k: v for k, v in recorded.items() if k not in RUN_LOCAL_KEYS}


def identity_differences(recorded: dict, ours: dict) -> list[str]:
    """'key: recorded X, now Y' for each field of two run identities (Config.run_identity) that differs. env.game
    is not compared: the run directory already fixes the game, whatever its spelling (pong, Pong, ALE/Pong-v5)."""
    a, b = flatten_keys(recorded), flatten_keys(ours)
    return [f"{k}: recorded {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k != "env.game" and comparable(a.get(k)) != comparable(b.get(k))]


def config_mismatch(diffs: list[str], where: Path, done: bool = False) -> str:
    """The error for a run directory whose recorded run identity differs from ours in ``diffs``
    (identity_differences): what differs, and what to do."""
    if done:  # reusing it would report another config's results under this one's name
        return (f"This run directory holds a finished run of a different config ({where}): {'; '.join(diffs[:8])}. "
                f"Use the original settings to reuse it, or another runs_root or seed to train this config "
                f"(or move the finished run away).")
    return (f"This run directory was started with a different config ({where}): {'; '.join(diffs[:8])}. "
            f"Resuming would silently change the run. Use the original settings, choose another variant name "
            f"or seed, or pass force=true to resume anyway.")


def check_recorded_config(recorded: dict, cfg: Config, where: Path, done: bool = False,
                          force: bool = False) -> list[str]:
    """How ``cfg``'s run identity differs from the ``recorded`` config of a run directory (its config.yaml at
    ``where``; ``done``: a finished run); a ConfigError saying so and what to do, unless ``force``."""
    diffs = identity_differences(recorded_identity(recorded), cfg.run_identity())
    if diffs and not force:
        raise ConfigError(config_mismatch(diffs, where, done))
    return diffs


def comparable(v: Any) -> Any:
    """A config value as recorded YAML gives it back (tuples become lists), for comparing with a recorded one."""
    return list(v) if isinstance(v, tuple) else v


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (so lists and booleans work) and checked later."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} is not of the form key=value (e.g. agent.lr=0.0001).")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _resolve_key(key: str) -> str:
    """Map a bare leaf name to its dotted path when exactly one field has that name."""
    valid = _all_keys()
    if key in valid:
        return key
    if key.startswith("env.overrides."):
        return key
    matches = [v for v in valid if v.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"Override key {key!r} is ambiguous: write one of {', '.join(matches)}.")
    raise _unknown_key(key, valid, "the command line")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict ``data`` with each ``key=value`` applied."""
    data = _to_plain(dict(data))
    for text in overrides:
        key, value = parse_override(text)
        path = _resolve_key(key).split(".")
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Cannot set {key}: {part} is not a section.")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The file's mapping, with its ``base:`` (if any) resolved.

    ``base: other.yaml`` (relative to this file) makes the file a layer over another config: the base is
    read first (recursively) and this file's keys are merged over it with :func:`deep_merge`. It is how
    each Rainbow ablation is Rainbow's file with one switch turned off, without a copy of the rest.
    """
    path = Path(path)
    if not path.exists():
        configs = sorted(f"configs/{p.name}" for p in Path("configs").glob("*.yaml") if p.stem != "smoke")
        hint = f" Available: {', '.join(configs)}." if configs else ""
        raise ConfigError(f"Config file {str(path)!r} does not exist.{hint}")
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a directory; give a YAML config file, e.g. configs/nature_dqn.yaml.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {str(path)!r} is not valid UTF-8 YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of sections (env:, agent:, ...).")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"Config file {str(path)!r}: base must be the path of another YAML file relative to it "
                          f"(e.g. base: ../rainbow.yaml), got {base!r}.")
    chain = (*_chain, path.resolve())
    base_path = path.parent / base
    if base_path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ConfigError(f"Config files include each other through base: ({cycle}); remove one of these base: lines.")
    if not base_path.exists():
        raise ConfigError(f"Config file {str(path)!r} has base: {base!r}, but {str(base_path)!r} does not exist; "
                          f"base paths are relative to the file that names them.")
    return deep_merge(read_yaml(base_path, chain), data)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (optional), apply ``key=value`` overrides, and check every value."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return config_from_dict(data, where=str(path) if path else "the command line")


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every field: the `--help` listing."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    rows = []
    defaults = cls()
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, f"{prefix}{name}."))
        else:
            rows.append((prefix + name, repr(getattr(defaults, name)), docs.get(name, "")))
    return rows


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` layered over ``base`` (nested sections merged key by key)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def find_variant_config(variant: str, configs_dir: str | Path = "configs") -> Path:
    """configs/<variant>.yaml or configs/ablations/<variant>.yaml; a clear error lists what exists."""
    configs_dir = Path(configs_dir)
    for candidate in (configs_dir / f"{variant}.yaml", configs_dir / "ablations" / f"{variant}.yaml"):
        if candidate.exists():
            return candidate
    # The variants are what the lookup above finds; smoke.yaml and configs/control/ are layers, not variants.
    known = sorted(p.stem for p in [*configs_dir.glob("*.yaml"), *configs_dir.glob("ablations/*.yaml")]
                   if p.stem != "smoke")
    close = difflib.get_close_matches(variant, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"Unknown variant {variant!r}: no configs/{variant}.yaml.{hint} Known variants: {', '.join(known)}.")


def _count(text: str) -> float | None:
    """A count written as 10000000, 10_000_000, 1e7, 10M or 500k (k, M, G: thousands, millions, billions); None
    if it is not one."""
    m = re.fullmatch(r"([-+]?[0-9._]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)", text.strip())
    try:
        return float(m.group(1).replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    except (AttributeError, ValueError):
        return None


def parse_frames(text: str | int | None) -> int | None:
    """A frame budget as 10000000, 1e7, 10M or 500k; None when empty."""
    if text is None or str(text).strip() == "":
        return None
    value = _count(str(text))
    if value is None:
        raise ConfigError(f"--frames must be a number of frames like 10000000, 1e7 or 10M; got {text!r}.")
    if value < 1 or not value.is_integer():
        raise ConfigError(f"--frames must be a positive whole number of frames; got {text!r}.")
    return int(value)


def flatten_keys(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted.key: value} (env.overrides stays one value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
