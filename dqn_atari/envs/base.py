"""The vector-environment contract shared by Atari and the small control tasks.

Every environment in :mod:`dqn_atari.envs` is a batch of ``num_envs`` copies stepped in lockstep:

- ``reset(seed=None) -> (obs, info)`` and ``step(actions) -> (obs, reward, terminated, truncated, info)``,
  ``obs`` of shape ``(num_envs, *obs_shape)`` with the frame stack first (``obs[:, -1]`` is the newest
  frame; control tasks use a stack of one).
- Autoreset happens in the same step: when env ``i``'s episode ends (game over or the step/frame cap),
  ``obs[i]`` is already the first observation of its next episode and ``info["final_obs"][i]`` is the last
  observation of the finished one (rows of envs that did not end are unspecified).
- ``reward`` is what the learner sees (clipped to its sign when the protocol says so);
  ``info["raw_reward"]`` is the game's own reward, and ``info["episode_return"]`` (the raw score of each
  episode that ended this step, NaN elsewhere) is what gets reported, always.
- ``terminated`` is the terminal for learning: game over, or a lost life when the protocol marks life
  losses and the env is in training mode. A life loss never resets anything. ``truncated`` means the
  episode hit its cap without a game over.
- ``info`` holds arrays of length ``num_envs``: ``raw_reward`` (float32), ``life_loss`` (the life counter
  dropped this step, including the last life at a game over), ``game_over``, ``episode_end`` (game over
  or truncated: the env was reset), ``episode_return`` (float64, NaN where no episode ended),
  ``episode_length`` (agent steps) and ``episode_frames`` (emulator frames after the reset, i.e. without
  no-op start frames) of the episode that ended (0 elsewhere), ``lives`` (of the returned observation,
  so a new episode's after a reset) and ``final_obs``.

Seeding makes runs exactly resumable: seeded resets use :func:`derive_episode_seed` ``(seed, i, k)`` for
episode ``k`` of env ``i``, so the state of an env at any moment is a function of the run seed, the index
of the last seeded episode and the actions taken since (Atari reseeds only now and then, see
:mod:`dqn_atari.envs.atari`). ``state_dict()`` records this (plus running episode statistics) in a small
JSON-serialisable dict, and ``load_state_dict()`` rebuilds the exact state, after which ``step`` returns
exactly what the original env would have returned.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import numpy as np

#: Version of the ``state_dict`` layout; bump when it changes so old checkpoints fail loudly.
STATE_FORMAT = 1

# ale-py's vector env takes seeds as C ``int`` and treats negative ones as "do not reseed".
_MAX_SEED = 2**31 - 1


def derive_episode_seed(seed: int, env_index: int, episode_index: int) -> int:
    """The seed of episode ``episode_index`` of env ``env_index`` in a run seeded with ``seed``.

    SeedSequence hashes the triple, so neighbouring runs, envs and episodes get unrelated streams.
    """
    state = np.random.SeedSequence([int(seed), int(env_index), int(episode_index)]).generate_state(1)
    return int(state[0]) & _MAX_SEED


def closest(name: str, valid: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` entries of ``valid`` closest to ``name`` (difflib ratio), best first."""
    return difflib.get_close_matches(name, list(valid), n=n, cutoff=0.0)


def check_keys(given: Iterable[str], valid: Iterable[str], what: str) -> None:
    """Raise ValueError for the first key of ``given`` that is not in ``valid``, naming the closest one."""
    valid = list(valid)
    for key in given:
        if key not in valid:
            guess = closest(key, valid, n=1)
            hint = f" Did you mean {guess[0]!r}?" if guess else ""
            raise ValueError(f"Unknown {what} {key!r}.{hint} Valid: {', '.join(sorted(valid))}.")


class VectorEnv(ABC):
    """Bookkeeping common to all our vector envs: seeds, autoreset, life losses, episode statistics, info.

    Subclasses implement the backend: ``_backend_reset``, ``_backend_step`` and their part of the state.
    """

    num_envs: int
    num_actions: int
    obs_shape: tuple[int, ...]
    obs_dtype: type
    frame_stack: int
    action_meanings: list[str]
    spec_name: str
    clip_rewards: bool = False
    terminal_on_life_loss: bool = False

    def __init__(self, num_envs: int, seed: int, training: bool = True) -> None:
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}.")
        self.num_envs = int(num_envs)
        self.seed = int(seed)
        #: Evaluation envs (``training=False``) never turn a life loss into a terminal.
        self.training = bool(training)
        n = self.num_envs
        self._started = False
        self._episode_index = np.zeros(n, np.int64)
        self._episode_return = np.zeros(n, np.float64)
        self._episode_length = np.zeros(n, np.int64)
        self._no_return = np.full(n, np.nan)  # info["episode_return"] of envs whose episode goes on
        self._lives = np.zeros(n, np.int64)
        self._obs: np.ndarray | None = None  # last observation handed out (checked by load_state_dict)
        self._pending: np.ndarray | None = None  # actions of a step_async not yet waited for

    # ----- backend interface -------------------------------------------------------------------------
    @abstractmethod
    def _backend_reset(self, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Start episode ``self._episode_index[i]`` in the envs ``i`` selected by ``mask`` (all if None).
        Returns the observation and lives of *all* envs."""

    @abstractmethod
    def _backend_step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step every env. Returns ``(obs, raw_reward, game_over, truncated, lives, episode_frames)``
        where ``truncated`` is the cap (the base class masks it with ``~game_over``) and
        ``episode_frames`` counts emulator frames since the episode started."""

    @abstractmethod
    def _backend_state(self) -> dict[str, Any]:
        """The backend's part of ``state_dict`` (JSON-serialisable)."""

    @abstractmethod
    def _backend_load(self, state: dict[str, Any]) -> np.ndarray:
        """Restore the backend from its part of ``state`` (base fields are already restored). Returns obs."""

    def _config(self) -> dict[str, Any]:
        """Settings a state must have been saved under to be loadable here."""
        return {"spec_name": self.spec_name, "num_envs": self.num_envs}

    def _seeds(self, mask: np.ndarray | None = None) -> np.ndarray:
        """:func:`derive_episode_seed` for the current episodes of the envs in ``mask`` (all if None)."""
        index = np.arange(self.num_envs) if mask is None else np.flatnonzero(mask)
        return np.array(
            [derive_episode_seed(self.seed, i, self._episode_index[i]) for i in index], dtype=np.int64
        )

    # ----- public API --------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Start a new episode in every env.

        With ``seed`` the run restarts from episode 0 of that seed; without it each env moves on to its
        next episode index (so repeated resets give fresh episodes, still reproducibly).
        """
        if seed is not None:
            self.seed = int(seed)
            self._episode_index[:] = 0
        elif self._started:
            self._episode_index += 1
        obs, lives = self._backend_reset(None)
        self._started = True
        self._episode_return[:] = 0.0
        self._episode_length[:] = 0
        self._lives[:] = lives
        self._obs = obs
        return obs, {"lives": self._lives.copy(), "episode_index": self._episode_index.copy()}

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Advance every env by one agent step; see the module docstring for what comes back."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Start a step; :meth:`step_wait` returns what ``step(actions)`` would. Atari envs step in their C++
        threads meanwhile, so several envs (the runs of one process) step in parallel: send to all, then wait."""
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}.step() called before reset(); call reset() first.")
        self._pending = self._check_actions(actions)
        self._backend_step_async(self._pending)

    def _backend_step_async(self, actions: np.ndarray) -> None:
        """Backends that cannot step in the background step in :meth:`_backend_step_wait`."""

    def _backend_step_wait(self) -> tuple[np.ndarray, ...]:
        return self._backend_step(self._pending)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        if self._pending is None:
            raise RuntimeError(f"{type(self).__name__}.step_wait() without step_async(actions) first.")
        obs, raw_reward, game_over, cap, lives, episode_frames = self._backend_step_wait()
        self._pending = None
        # Small arrays (one per env): a new array from a ufunc costs a third of an in-place one here.
        raw_reward = raw_reward.astype(np.float32, copy=False)
        game_over = game_over.astype(bool, copy=False)
        truncated = cap & ~game_over
        self._episode_return = self._episode_return + raw_reward
        self._episode_length = self._episode_length + 1
        # A drop in the life counter; it also fires on the last life of a game over, which is terminal anyway.
        life_loss = lives < self._lives
        self._lives = lives.astype(np.int64)  # a copy

        ended = game_over | truncated
        episode_return = self._no_return.copy()  # NaN
        episode_length = np.zeros(self.num_envs, np.int64)
        episode_frames_out = np.zeros(self.num_envs, np.int64)
        final_obs = obs  # rows of envs that did not end are unspecified, so no copy is needed then
        if np.count_nonzero(ended):
            final_obs = obs.copy()
            episode_return[ended] = self._episode_return[ended]
            episode_length[ended] = self._episode_length[ended]
            episode_frames_out[ended] = episode_frames[ended]
            self._episode_index[ended] += 1
            new_obs, new_lives = self._backend_reset(ended)
            obs[ended] = new_obs[ended]
            self._lives[ended] = new_lives[ended]
            self._episode_return[ended] = 0.0
            self._episode_length[ended] = 0

        # Nature 2015, Methods: the number of lives left "is then used to mark the end of an episode during
        # training".
        terminated = game_over | life_loss if self.terminal_on_life_loss and self.training else game_over.copy()
        reward = np.sign(raw_reward) if self.clip_rewards else raw_reward.copy()
        self._obs = obs
        info = {
            "raw_reward": raw_reward,
            "life_loss": life_loss,
            "game_over": game_over,
            "episode_end": ended,
            "episode_return": episode_return,
            "episode_length": episode_length,
            "episode_frames": episode_frames_out,
            "lives": self._lives.copy(),
            "final_obs": final_obs,
        }
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        """Release the backend (threads, emulators). Safe to call twice."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this env's exact state: small and JSON-serialisable."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "config": self._config(),
            "seed": self.seed,
            "training": self.training,
            "started": self._started,
        }
        if self._started:
            state.update(
                episode_index=self._episode_index.tolist(),
                episode_return=self._episode_return.tolist(),
                episode_length=self._episode_length.tolist(),
                lives=self._lives.tolist(),
                backend=self._backend_state(),
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the exact state recorded by :meth:`state_dict` (the next ``step`` continues it)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"Env state has format {state.get('format')!r}, this code reads format {STATE_FORMAT}; "
                "it was written by an incompatible version of dqn_atari.envs."
            )
        mine, theirs = self._config(), state["config"]
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"Env state was saved from a different env ({detail}). Build the env with the same settings."
            )
        self.seed = int(state["seed"])
        self.training = bool(state["training"])
        self._started = bool(state["started"])
        if not self._started:
            return
        self._episode_index[:] = state["episode_index"]
        self._episode_return[:] = state["episode_return"]
        self._episode_length[:] = state["episode_length"]
        self._lives[:] = state["lives"]
        self._obs = self._backend_load(state["backend"])

    # ----- helpers -----------------------------------------------------------------------------------
    def _check_actions(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or actions.dtype.kind not in "iu":
            raise ValueError(
                f"actions must be an integer array of shape ({self.num_envs},), "
                f"got dtype {actions.dtype} and shape {actions.shape}."
            )
        values = actions.tolist()  # min and max of a list: a tenth of numpy's reductions on a few actions
        if min(values) < 0 or max(values) >= self.num_actions:
            raise ValueError(
                f"actions must lie in [0, {self.num_actions}) for {self.spec_name}, got {values}."
            )
        return actions.astype(np.int64, copy=False)

    def __enter__(self) -> VectorEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec_name!r}, num_envs={self.num_envs}, seed={self.seed})"
