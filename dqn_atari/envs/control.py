"""Small control tasks with the Atari envs' interface, for fast learning tests.

- :func:`make_cartpole`: Gymnasium's CartPole-v1 dynamics (reward 1 per step including the last, episode
  ends when the pole falls or the cart leaves the track, truncation at ``max_episode_steps``).
  Observations: float32 ``(num_envs, 1, 4)``.
- :func:`make_maze`: a deterministic grid maze with walls. The agent starts in the top-left corner and
  gets reward 1 (and a terminal) on reaching the bottom-right corner; otherwise 0 until the step limit.
  Observations: a one-hot float32 vector over the cells, ``(num_envs, 1, size * size)``.
- :func:`make_bitflip`: the goal-conditioned n-bit flipping task of hindsight experience replay
  (Andrychowicz et al. 2017, Sec. 3.1). Observations: float32 ``(num_envs, 1, 2n)``, the state bits then the
  goal bits.

Both are vector envs with same-step autoreset and the ``info`` keys of :mod:`dqn_atari.envs.base`
(no lives: ``life_loss`` is always False; rewards are not clipped; one "frame" per step).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv

from dqn_atari.envs.base import VectorEnv


class CartPole(VectorEnv):
    """``num_envs`` Gymnasium ``CartPoleEnv`` instances (the CartPole-v1 dynamics) stepped in lockstep."""

    spec_name = "CartPole"
    num_actions = 2
    action_meanings = ["LEFT", "RIGHT"]
    obs_shape = (1, 4)
    obs_dtype = np.float32
    frame_stack = 1

    def __init__(self, num_envs: int = 1, seed: int = 0, max_episode_steps: int = 500) -> None:
        super().__init__(num_envs, seed)
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}.")
        self.max_episode_steps = int(max_episode_steps)  # CartPole-v1's TimeLimit is 500
        self._envs = [CartPoleEnv() for _ in range(self.num_envs)]

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "max_episode_steps": self.max_episode_steps}

    def _observe(self) -> np.ndarray:
        return np.array([env.state for env in self._envs], dtype=np.float32)[:, None, :]

    def _backend_reset(self, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        index = range(self.num_envs) if mask is None else np.flatnonzero(mask)
        for i, seed in zip(index, self._seeds(mask)):
            self._envs[i].reset(seed=int(seed))  # draws the start state uniformly in [-0.05, 0.05]^4
        return self._observe(), np.zeros(self.num_envs, np.int64)

    def _backend_step(self, actions: np.ndarray):
        terminated = np.array([env.step(int(a))[2] for env, a in zip(self._envs, actions)])
        steps = self._episode_length + 1  # the base class counts this step after we return
        reward = np.ones(self.num_envs, np.float32)  # CartPole-v1: +1 for every step, the last included
        cap = steps >= self.max_episode_steps
        return self._observe(), reward, terminated, cap, np.zeros_like(steps), steps

    def _backend_state(self) -> dict[str, Any]:
        # The float64 physics state round-trips exactly through JSON (repr of a float is exact).
        return {"physics": [np.asarray(env.state, np.float64).tolist() for env in self._envs]}

    def _backend_load(self, state: dict[str, Any]) -> np.ndarray:
        for env, physics in zip(self._envs, state["physics"]):
            env.state = np.array(physics, np.float64)
            env.steps_beyond_terminated = None
        return self._observe()


def maze_layout(size: int) -> np.ndarray:
    """Boolean wall map of the ``size`` x ``size`` maze (True = wall).

    Every odd column except the last is a wall with one gap, alternately at the bottom and at the top,
    so the only route snakes through the columns. ``size=5`` (S start, G goal, # wall; shortest path
    16 steps)::

        S # . . .
        . # . # .
        . # . # .
        . # . # .
        . . . # G
    """
    walls = np.zeros((size, size), bool)
    for n, col in enumerate(range(1, size - 1, 2)):
        walls[:, col] = True
        walls[size - 1 if n % 2 == 0 else 0, col] = False
    return walls


class GridMaze(VectorEnv):
    """The maze of :func:`maze_layout`: start top-left, goal bottom-right, moves into walls do nothing."""

    spec_name = "Maze"
    action_meanings = ["UP", "DOWN", "LEFT", "RIGHT"]
    num_actions = 4
    obs_dtype = np.float32
    frame_stack = 1
    _MOVES = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])  # (row, col) deltas in action order

    def __init__(self, num_envs: int = 1, seed: int = 0, size: int = 5, max_episode_steps: int = 100) -> None:
        super().__init__(num_envs, seed)
        if size < 2:
            raise ValueError(f"Maze size must be >= 2, got {size}.")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}.")
        self.size = int(size)
        self.max_episode_steps = int(max_episode_steps)
        self.walls = maze_layout(self.size)
        self.goal = (self.size - 1, self.size - 1)
        self.obs_shape = (1, self.size * self.size)
        self._pos = np.zeros((self.num_envs, 2), np.int64)  # (row, col) of each env's agent

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "size": self.size, "max_episode_steps": self.max_episode_steps}

    def _observe(self) -> np.ndarray:
        obs = np.zeros((self.num_envs, 1, self.size * self.size), np.float32)
        obs[np.arange(self.num_envs), 0, self._pos[:, 0] * self.size + self._pos[:, 1]] = 1.0
        return obs

    def _backend_reset(self, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        # The maze is deterministic: nothing to seed.
        self._pos[slice(None) if mask is None else mask] = 0
        return self._observe(), np.zeros(self.num_envs, np.int64)

    def _backend_step(self, actions: np.ndarray):
        target = np.clip(self._pos + self._MOVES[actions], 0, self.size - 1)
        free = ~self.walls[target[:, 0], target[:, 1]]
        self._pos[free] = target[free]
        at_goal = (self._pos[:, 0] == self.goal[0]) & (self._pos[:, 1] == self.goal[1])
        steps = self._episode_length + 1  # the base class counts this step after we return
        reward = at_goal.astype(np.float32)
        return self._observe(), reward, at_goal, steps >= self.max_episode_steps, np.zeros_like(steps), steps

    def _backend_state(self) -> dict[str, Any]:
        return {"position": self._pos.tolist()}

    def _backend_load(self, state: dict[str, Any]) -> np.ndarray:
        self._pos[:] = state["position"]
        return self._observe()


class BitFlip(VectorEnv):
    """n-bit flipping (Andrychowicz et al. 2017, Sec. 3.1 and Appendix A), goal-conditioned.

    State s in {0,1}^n, action i flips bit i, reward -[s' != g] after each step (0 on a step that lands on
    the goal, -1 otherwise). Every episode lasts exactly n steps and never terminates: Appendix A counts an
    episode as a success "if the goal state was achieved at an arbitrary timestep during the episode", and
    the paper bootstraps with gamma "for all transitions including the ones ending an episode", so the end of an
    episode is a time-limit truncation here. Hence ``episode_return > -n`` exactly when the goal was reached
    (:meth:`succeeded`).

    Start state and goal are drawn uniformly (Sec. 3.1); a goal equal to the start state is redrawn, as
    Appendix A does for the robot tasks ("we discard initial state-goal pairs in which the goal is already
    satisfied"), so no episode is won without acting.

    Goal layout, which :class:`dqn_atari.replay.HindsightReplayBuffer` relies on: the observation is
    ``s || g`` (``goal_size`` = n entries each) and the goal achieved in a state is the state itself (the
    paper's m(s) = s).
    """

    spec_name = "BitFlip"
    obs_dtype = np.float32
    frame_stack = 1

    def __init__(self, num_envs: int = 1, seed: int = 0, n_bits: int = 10) -> None:
        super().__init__(num_envs, seed)
        if n_bits < 1:
            raise ValueError(f"BitFlip needs at least 1 bit, got n_bits={n_bits}.")
        self.n_bits = self.goal_size = self.num_actions = self.max_episode_steps = int(n_bits)
        self.spec_name = f"BitFlip{self.n_bits}"
        self.action_meanings = [f"FLIP_{i}" for i in range(self.n_bits)]
        self.obs_shape = (1, 2 * self.n_bits)
        self._state = np.zeros((self.num_envs, self.n_bits), np.float32)
        self._goal = np.zeros((self.num_envs, self.n_bits), np.float32)

    def succeeded(self, episode_return: np.ndarray | float) -> np.ndarray:
        """Whether an episode with this return reached its goal (every missed step costs -1, a hit 0)."""
        return np.asarray(episode_return) > -self.n_bits

    def _observe(self) -> np.ndarray:
        return np.concatenate([self._state, self._goal], axis=1)[:, None, :]

    def _backend_reset(self, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        index = range(self.num_envs) if mask is None else np.flatnonzero(mask)
        for i, seed in zip(index, self._seeds(mask)):
            rng = np.random.default_rng(int(seed))
            self._state[i] = rng.integers(0, 2, self.n_bits)
            self._goal[i] = self._state[i]
            while np.array_equal(self._goal[i], self._state[i]):
                self._goal[i] = rng.integers(0, 2, self.n_bits)
        return self._observe(), np.zeros(self.num_envs, np.int64)

    def _backend_step(self, actions: np.ndarray):
        rows = np.arange(self.num_envs)
        self._state[rows, actions] = 1.0 - self._state[rows, actions]
        reached = (self._state == self._goal).all(axis=1)
        reward = np.where(reached, 0.0, -1.0).astype(np.float32)
        steps = self._episode_length + 1  # the base class counts this step after we return
        never = np.zeros(self.num_envs, bool)
        return self._observe(), reward, never, steps >= self.n_bits, np.zeros_like(steps), steps

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "n_bits": self.n_bits}

    def _backend_state(self) -> dict[str, Any]:
        return {"state": self._state.astype(int).tolist(), "goal": self._goal.astype(int).tolist()}

    def _backend_load(self, state: dict[str, Any]) -> np.ndarray:
        self._state[:] = state["state"]
        self._goal[:] = state["goal"]
        return self._observe()


def make_cartpole(num_envs: int = 1, seed: int = 0, max_episode_steps: int = 500) -> CartPole:
    """CartPole-v1 as a vector env: float32 obs ``(num_envs, 1, 4)``, 2 actions, truncation at 500 steps."""
    return CartPole(num_envs, seed, max_episode_steps)


def make_maze(num_envs: int = 1, seed: int = 0, size: int = 5, max_episode_steps: int = 100) -> GridMaze:
    """The maze of :func:`maze_layout` as a vector env: one-hot float32 obs ``(num_envs, 1, size**2)``."""
    return GridMaze(num_envs, seed, size, max_episode_steps)


def make_bitflip(num_envs: int = 1, seed: int = 0, n_bits: int = 10) -> BitFlip:
    """n-bit flipping as a vector env: float32 obs ``(num_envs, 1, 2 * n_bits)`` (state, goal), n actions."""
    return BitFlip(num_envs, seed, n_bits)
