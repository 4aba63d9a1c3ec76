"""Atari 2600 games through ale-py (its threaded C++ ``AtariVectorEnv``), under a named evaluation protocol.

``make_atari("Breakout")`` gives a vector env (see :mod:`dqn_atari.envs.base` for the contract) whose
observations are uint8 arrays of shape ``(num_envs, 4, 84, 84)``, newest frame last, built exactly as:

1. each agent step repeats the action for ``frame_skip`` (4) emulator frames and sums their rewards
   (Nature 2015, Methods, frame skipping with k=4);
2. the ALE grayscale screens (palette luminance, the paper's Y channel) of the last two of those frames
   are max-pooled pixel-wise, which removes the flicker of sprites drawn every other frame (Methods,
   preprocessing);
3. the pooled 210x160 screen is resized to 84x84 with OpenCV's area interpolation (``cv2.INTER_AREA``; one env
   computes the same pixels with :mod:`dqn_atari.envs.screens`);
4. the last ``frame_stack`` (4) such frames are stacked, oldest first (Methods: m = 4).

Several envs run in C++ (``ale_py.vector_env.AtariVectorEnv``, one worker thread per env up to the cores); a
single env runs the same steps in Python in this thread, which is faster for one env
(:mod:`dqn_atari.envs.emulators`; ``backend=`` chooses). With ``noop_max=0``,
``repeat_action_probability=0`` and ``fire_reset=False`` it is pixel-for-pixel what a plain Python loop over
``ale_py.ALEInterface`` computes (``tests/test_envs.py`` checks this on Breakout and Pong, and with
sticky actions against a raw ALE with the same seed), and the two backends give the same observations with
every protocol setting.

Details found by reading and testing ale-py 0.12.1's ``preprocessed_env.cpp``:

- **Frame stack after a reset: zero padding.** The stack is cleared to zeros at every reset and the
  first observation holds the start screen in the newest slot only: ``obs[i] = [0, 0, 0, f0]``, then
  ``[0, 0, f0, f1]`` after one step, and so on. ``f0`` is the single start screen (pooled with a zero
  frame, i.e. unchanged). Frames never leak across episodes.
- **No-op starts are emulator frames, 0..noop_max-1 of them.** At each reset ALE presses NOOP for
  ``U{0, ..., noop_max-1}`` single frames (not agent steps), drawn from the env's own generator
  (reseeded at each ROM reload, see below). Nature 2015 (Methods; Extended Data Table 1, "no-op max
  30") says "up to 30"; DeepMind's released code (alewrap ``nextRandomGame``: ``torch.random(30)``
  one-frame ``_step(0)`` calls) and OpenAI baselines' ``NoopResetEnv`` (below the frame skip) both
  take 1..30 *frames*. ALE's 0..29 is one frame short of that: a documented deviation of one emulator
  frame (1/60 s).
- **Fire reset** (``fire_reset=True``) presses FIRE for one frame at each reset (not after a lost life),
  in place of one of the no-op frames, in games whose action set has FIRE.
- **Game over inside an action repeat** stops emulation at the game-over frame, so the newest frame of
  ``info["final_obs"]`` at a game over is the previous step's frame, not the game-over screen. This does
  not matter for learning (a terminal transition is not bootstrapped) and the reward is complete.
- **The frame cap** (``max_episode_frames``) is enforced here, not in C++: an episode is truncated at
  the first agent step whose frames since the reset (no-op frames excluded) reach the cap. ALE's own cap
  would stop mid-step without capturing the last frame and corrupt ``final_obs``, the very observation a
  truncated transition bootstraps from, so we hand ALE a cap it never reaches.
- **Life loss** is ``lives < lives before the step``; ALE's own life-loss flags are off so its
  ``terminated`` means game over only. Rewards leave ALE unclipped (``info["raw_reward"]``) and are
  clipped to their sign here.
- **Sticky actions** (``repeat_action_probability``) are ALE's: at every emulator frame, with that
  probability the previously executed action is repeated instead of the new one (Machado et al. 2018,
  "sticky actions"). Their generator is ALE's, seeded when the ROM is (re)loaded.

**Seeding and exact resume.** A seeded reset in ale-py reloads the ROM (the only way to reseed ALE's
generators), which costs about 0.2 s, mostly ALE rebuilding its colour-averaging palette. Paying that at
every episode end would more than halve throughput while episodes are short (random play in Breakout
ends after ~200 agent steps, ~0.15 s). So an env reloads its ROM with seed
``derive_episode_seed(seed, env_index, episode_index)`` only at the first reset and at episode ends once
``reseed_interval`` agent steps (default 10,000) have passed since it last did; other episode ends just
restart the game (``reset_game``, ~0.01 s), with ALE's generators running on, as Gymnasium's ALE envs and
DeepMind's code always did. The emulator state therefore stays a function of (seed, the episode index
of the last reload, the actions since), which is what ``state_dict`` records and ``load_state_dict``
replays: a resume replays at most ``reseed_interval`` + one episode of agent steps, in lockstep for all
envs (10,000 steps take ~8 s for 1 env at ~1,300 steps/s). ``reseed_interval=0`` reloads at every
episode end (each episode then depends on its seed alone) and replays only the current episode.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from ale_py import roms
from ale_py.registration import rom_id_to_name

from dqn_atari.envs.base import VectorEnv, check_keys, closest
from dqn_atari.envs.emulators import InProcess, Threaded


@dataclass(frozen=True)
class AtariProtocol:
    """How an Atari game is turned into an RL problem. Presets live in :data:`PROTOCOLS`."""

    name: str = "custom"
    """Preset this protocol came from (metadata, not overridable)."""
    description: str = ""
    """Citation and summary, written into results by the trainer (metadata, not overridable)."""
    noop_max: int = 30
    """Random no-op start: at each reset ALE plays NOOP for U{0..noop_max-1} emulator frames (0 = none)."""
    frame_skip: int = 4
    """Agent steps last this many emulator frames, repeating the action and summing rewards."""
    repeat_action_probability: float = 0.0
    """Sticky actions: per-frame probability of repeating the previously executed action."""
    full_action_space: bool = False
    """True: all 18 joystick actions; False: the game's minimal action set."""
    terminal_on_life_loss: bool = True
    """In training mode, a lost life is a terminal for learning (the game itself goes on)."""
    fire_reset: bool = False
    """Press FIRE for one frame at each reset in games that have it (OpenAI baselines' FireResetEnv idea)."""
    max_episode_frames: int = 108_000
    """Truncate an episode after this many emulator frames (no-op start frames not counted)."""
    clip_rewards: bool = True
    """The learner sees sign(reward); the raw reward stays in info and scores."""
    frame_stack: int = 4
    """Number of most recent preprocessed frames stacked into one observation."""
    screen_size: int = 84
    """Side of the square grayscale frame after the area resize."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: a range check on a string would be a TypeError
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{_named(f.name)} must be true or false, got {value!r}.")
            if f.type in ("int", "float") and (isinstance(value, (bool, np.bool_))
                                               or not isinstance(value, (int, float, np.integer, np.floating))
                                               or not math.isfinite(value)):
                raise ValueError(f"{_named(f.name)} must be a finite number, got {value!r}.")
            if f.type == "int" and int(value) != value:
                raise ValueError(f"{_named(f.name)} must be an integer, got {value!r}.")
        ranges = {
            "noop_max": (self.noop_max >= 0, ">= 0"),
            "frame_skip": (self.frame_skip >= 1, ">= 1"),
            "repeat_action_probability": (0.0 <= self.repeat_action_probability < 1.0, "in [0, 1)"),
            "max_episode_frames": (self.max_episode_frames >= 1, ">= 1"),
            "frame_stack": (self.frame_stack >= 1, ">= 1"),
            "screen_size": (self.screen_size >= 1, ">= 1"),
        }
        for key, (ok, valid) in ranges.items():
            if not ok:
                raise ValueError(f"{_named(key)} must be {valid}, got {getattr(self, key)!r}.")


def _named(key: str) -> str:
    return f"AtariProtocol.{key} (env.overrides.{key} in a run's config)"


_METADATA_FIELDS = ("name", "description")
#: Fields that ``get_protocol(name, **overrides)`` and ``make_atari(..., **overrides)`` accept.
PROTOCOL_FIELDS = tuple(f.name for f in dataclasses.fields(AtariProtocol) if f.name not in _METADATA_FIELDS)

PROTOCOLS: dict[str, AtariProtocol] = {
    "nature2015": AtariProtocol(
        name="nature2015",
        description=(
            "Mnih et al. 2015, Nature 518:529 (DQN), Methods and Extended Data Table 1: minimal action set, "
            "no sticky actions, 0-29 no-op frames at reset (paper: up to 30), action repeat 4 with a max "
            "over the last two frames, grayscale 84x84, 4-frame stack, life loss terminal during training, "
            "rewards clipped to their sign; training episodes capped at 108,000 frames (30 min; evaluation "
            "episodes at 18,000 = 5 min, the run's eval.max_episode_frames)."
        ),
        noop_max=30,  # Extended Data Table 1: no-op max 30 (frames; see the module docstring)
        frame_skip=4,  # Extended Data Table 1: action repeat 4
        repeat_action_probability=0.0,  # sticky actions came later (Machado et al. 2018)
        full_action_space=False,  # Methods: "valid actions varied between 4 and 18": the minimal set
        terminal_on_life_loss=True,  # Methods, Training details: lives mark the end of an episode in training
        fire_reset=False,  # DeepMind's code had none; FireResetEnv came with OpenAI baselines
        max_episode_frames=108_000,  # 30 min at 60 Hz: ALE/Gymnasium's standard cap
        clip_rewards=True,  # Methods, Training details: positive rewards 1, negative -1
    ),
    "machado2018": AtariProtocol(
        name="machado2018",
        description=(
            "Machado et al. 2018, JAIR 61:523 (Revisiting the ALE), recommended settings as in Dopamine's "
            "default: sticky actions p=0.25 as the only source of stochasticity (no no-op starts), full "
            "18-action set, no life-loss terminal, action repeat 4 with a max over the last two frames, "
            "grayscale 84x84, 4-frame stack, rewards clipped for learning, training and evaluation episodes "
            "capped at 108,000 frames."
        ),
        # Machado et al. 2018 argue for sticky actions instead of no-op starts as the source of
        # stochasticity; Dopamine's atari_lib has no no-op starts either.
        noop_max=0,
        frame_skip=4,
        repeat_action_probability=0.25,  # Machado et al. 2018: stickiness 0.25
        full_action_space=True,  # Machado et al. 2018: all 18 actions, whatever the game uses
        terminal_on_life_loss=False,  # Machado et al. 2018: no life-loss signal, game over only
        fire_reset=False,
        max_episode_frames=108_000,  # Dopamine: 27,000 agent steps x 4 frames
        clip_rewards=True,
    ),
}


def get_protocol(name: str | AtariProtocol = "nature2015", **overrides: Any) -> AtariProtocol:
    """The preset ``name`` (or a given protocol) with ``overrides`` applied.

    Unknown preset names and unknown override keys raise ValueError naming the closest valid ones.
    Overrides are recorded in the description so results say what was changed.
    """
    if isinstance(name, AtariProtocol):
        base = name
    else:
        if name not in PROTOCOLS:
            raise ValueError(
                f"Unknown Atari protocol {name!r}. Known: {', '.join(PROTOCOLS)} "
                f"(closest: {', '.join(closest(str(name), PROTOCOLS, n=2))})."
            )
        base = PROTOCOLS[name]
    check_keys(overrides, PROTOCOL_FIELDS, "Atari protocol field")
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    if not changed:
        return base
    note = " Overrides: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()) + "."
    return dataclasses.replace(base, description=base.description + note, **changed)


# ----- game names ----------------------------------------------------------------------------------------
def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


_ROM_IDS: tuple[str, ...] = tuple(roms.get_all_rom_ids())
_BY_KEY: dict[str, str] = {_key(rom): rom for rom in _ROM_IDS}


def display_name(rom_id: str) -> str:
    """PascalCase name of an ale-py ROM id as Gymnasium spells it: ``space_invaders`` -> ``SpaceInvaders``."""
    return rom_id_to_name(rom_id)


def resolve_game(name: str) -> str:
    """The ale-py ROM id (snake_case) for any common spelling of a game.

    Accepts ``Breakout``, ``breakout``, ``BreakoutNoFrameskip-v4``, ``ALE/Breakout-v5``, ``SpaceInvaders``,
    ``space_invaders``, ``Space Invaders``. Unknown names raise ValueError listing the 5 closest games.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"Game name must be a non-empty string, got {name!r}.")
    stem = re.sub(r"^ALE/", "", name.strip(), flags=re.IGNORECASE)
    stem = re.sub(r"-v\d+$", "", stem)
    stem = re.sub(r"(NoFrameskip|Deterministic)$", "", stem)
    rom = _BY_KEY.get(_key(stem))
    if rom is None:
        near = [_BY_KEY[k] for k in closest(_key(stem), _BY_KEY, n=5)]
        listed = ", ".join(f"{display_name(r)} ({r})" for r in near)
        raise ValueError(
            f"Unknown Atari game {name!r}. Closest games ale-py ships: {listed}. "
            f"All {len(_ROM_IDS)} ids: ale_py.roms.get_all_rom_ids()."
        )
    return rom


# ----- the environment -----------------------------------------------------------------------------------
#: Agent steps between ROM reloads (seeded resets) of an env; see the module docstring.
DEFAULT_RESEED_INTERVAL = 10_000
#: How the emulators run (dqn_atari.envs.emulators); "auto": in-process for one env, C++ threads for more.
BACKENDS = ("auto", "inprocess", "threaded")


class AtariEnv(VectorEnv):
    """A protocol-configured batch of one Atari game; build it with :func:`make_atari`."""

    obs_dtype = np.uint8

    def __init__(
        self,
        game: str,
        protocol: AtariProtocol,
        num_envs: int = 1,
        seed: int = 0,
        training: bool = True,
        num_threads: int = 0,
        reseed_interval: int = DEFAULT_RESEED_INTERVAL,
        backend: str = "auto",
    ) -> None:
        super().__init__(num_envs, seed, training)
        self.game = resolve_game(game)
        self.spec_name = display_name(self.game)
        self.protocol = protocol
        self.clip_rewards = protocol.clip_rewards
        self.terminal_on_life_loss = protocol.terminal_on_life_loss
        self.frame_stack = protocol.frame_stack
        self.obs_shape = (protocol.frame_stack, protocol.screen_size, protocol.screen_size)
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0: one per env up to the cores), got {num_threads}.")
        if reseed_interval < 0:
            raise ValueError(f"reseed_interval must be >= 0 (0: every episode), got {reseed_interval}.")
        self.reseed_interval = int(reseed_interval)
        self.num_threads = min(num_threads or self.num_envs, self.num_envs, os.cpu_count() or 1)
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}.")
        if backend == "auto":
            backend = "inprocess" if self.num_envs == 1 else "threaded"
        self.backend = backend
        # We truncate ourselves (module docstring); ALE must never get there first.
        max_frames = protocol.max_episode_frames + protocol.frame_skip
        self._emu: Threaded | InProcess | None = (
            InProcess(self.game, self.num_envs, protocol, max_frames) if backend == "inprocess"
            else Threaded(self.game, self.num_envs, protocol, self.num_threads, max_frames)
        )
        self.num_actions = len(self._emu.action_set)
        self.action_meanings = [a.name for a in self._emu.action_set]
        n = self.num_envs
        self._frames_at_start = np.zeros(n, np.int64)  # ALE episode frame number right after the reset
        # Since each env's last seeded reset ("segment"): the episode it started and the actions taken (a
        # list per env: appending to it costs a quarter of a numpy write). The emulator state is a function
        # of these.
        self._segment_episode = np.zeros(n, np.int64)
        self._actions: list[list[int]] = [[] for _ in range(n)]

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        protocol = {key: getattr(self.protocol, key) for key in PROTOCOL_FIELDS}  # not name/description
        config.update(game=self.game, protocol=protocol, reseed_interval=self.reseed_interval)
        return config

    # ----- emulator calls ------------------------------------------------------------------------------
    def _reset_envs(self, mask: np.ndarray | None, seeded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reset the envs in ``mask`` (all if None); those in ``seeded`` reload the ROM with the seed of the
        episode they start, the others just restart the game. Returns obs and lives of all envs."""
        seeds = np.full(self.num_envs, -1, np.int64)  # -1: ALE keeps its generators running
        seeds[seeded] = self._seeds(seeded)
        obs, episode_frames, lives = self._require_open().reset(seeds, mask)
        selected = slice(None) if mask is None else mask
        self._frames_at_start[selected] = episode_frames[selected]
        return obs, lives

    def _step_envs(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        self._require_open().send(actions)
        return self._receive()

    def _receive(self) -> tuple[np.ndarray, ...]:
        obs, reward, game_over, episode_frames, lives = self._require_open().recv()
        frames = episode_frames - self._frames_at_start
        cap = frames >= self.protocol.max_episode_frames
        return obs, reward, game_over, cap, lives, frames

    # ----- backend interface ---------------------------------------------------------------------------
    def _backend_reset(self, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        everyone = np.ones(self.num_envs, bool)
        lengths = np.array([len(actions) for actions in self._actions])
        seeded = everyone if mask is None else mask & (lengths >= self.reseed_interval)
        self._segment_episode[seeded] = self._episode_index[seeded]
        for i in np.flatnonzero(seeded):
            self._actions[i] = []
        return self._reset_envs(mask, seeded)

    def _backend_step(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        self._backend_step_async(actions)
        return self._receive()

    def _backend_step_async(self, actions: np.ndarray) -> None:
        for log, action in zip(self._actions, actions.tolist()):
            log.append(action)
        self._require_open().send(actions)

    def _backend_step_wait(self) -> tuple[np.ndarray, ...]:
        return self._receive()

    def _backend_state(self) -> dict[str, Any]:
        assert self._obs is not None
        return {
            "segment_episode": self._segment_episode.tolist(),
            "actions": [list(actions) for actions in self._actions],
            # Checksums of the current observations: load_state_dict verifies its replay against them.
            "obs_crc32": [zlib.crc32(self._obs[i].tobytes()) for i in range(self.num_envs)],
        }

    def _backend_load(self, state: dict[str, Any]) -> np.ndarray:
        """Reseed each env as at the start of its segment and replay its actions, all envs ending together.

        Envs step in lockstep, so env i with L_i recorded actions is reseeded at lockstep step max(L) - L_i
        and replays from there, restarting games (unseeded) where its episodes ended, exactly as ``step``
        did; before that it takes NOOPs whose effect the reseeding wipes out.
        """
        actions = state["actions"]
        lengths = np.array([len(a) for a in actions], np.int64)
        total = int(lengths.max())
        start = total - lengths
        schedule = np.zeros((self.num_envs, total), np.int64)
        for i, acts in enumerate(actions):
            schedule[i, start[i] :] = acts
        if schedule.size and (schedule.min() < 0 or schedule.max() >= self.num_actions):
            raise ValueError(f"Env state has actions outside [0, {self.num_actions}) for {self.spec_name}.")
        self._actions = [row[begin:].tolist() for row, begin in zip(schedule, start.tolist())]
        self._segment_episode[:] = state["segment_episode"]

        # _seeds() derives from _episode_index, so point it at each segment's first episode while replaying.
        episode_index = self._episode_index.copy()
        self._episode_index[:] = self._segment_episode
        obs, _ = self._reset_envs(None, np.ones(self.num_envs, bool))
        ended = np.zeros(self.num_envs, bool)
        for t in range(total + 1):
            reseed = (start == t) & (t > 0)
            if (reseed | ended).any():
                obs, _ = self._reset_envs(reseed | ended, reseed)
            if t < total:
                obs, _, game_over, cap, _, _ = self._step_envs(schedule[:, t])
                ended = (game_over | cap) & (start <= t)  # envs still in their NOOP prefix are ignored
        self._episode_index[:] = episode_index

        crcs = [zlib.crc32(obs[i].tobytes()) for i in range(self.num_envs)]
        if crcs != list(state["obs_crc32"]):
            bad = [i for i, (a, b) in enumerate(zip(crcs, state["obs_crc32"])) if a != b]
            raise RuntimeError(
                f"Replaying the recorded actions did not reproduce the saved observations of envs {bad}; "
                "was the state saved with another ale-py version?"
            )
        return obs

    def _require_open(self) -> Threaded | InProcess:
        if self._emu is None:
            raise RuntimeError(f"{self!r} is closed.")
        return self._emu

    def close(self) -> None:
        if self._emu is not None:
            self._emu.close()
            self._emu = None


def make_atari(
    game: str,
    protocol: str | AtariProtocol = "nature2015",
    num_envs: int = 1,
    seed: int = 0,
    training: bool = True,
    num_threads: int = 0,
    reseed_interval: int = DEFAULT_RESEED_INTERVAL,
    backend: str = "auto",
    **overrides: Any,
) -> AtariEnv:
    """A vector env of ``num_envs`` copies of ``game`` under ``protocol`` (a preset name or an AtariProtocol).

    ``overrides`` change protocol fields (``noop_max=0``, ``max_episode_frames=18_000``, ...).
    ``training=False`` makes an evaluation env: life losses never terminate. ``num_threads`` is the number
    of C++ worker threads (0: one per env, up to the number of cores). ``reseed_interval``: an env reloads
    its ROM with a fresh seed at an episode end once this many agent steps have passed since it last did
    (0: at every episode end); see the module docstring for the trade-off. ``backend``: ``"threaded"`` runs
    the emulators in ale-py's C++ worker threads, ``"inprocess"`` in this thread, ``"auto"`` picks in-process
    for one env and threads for more (both give the same observations; :mod:`dqn_atari.envs.emulators`).
    """
    protocol = get_protocol(protocol, **overrides)
    return AtariEnv(game, protocol, num_envs, seed, training, num_threads, reseed_interval, backend)
