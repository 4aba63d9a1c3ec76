"""Environments: Atari 2600 games under named protocols, and small control tasks with the same interface.

The trainer builds every environment with :func:`make_env`; see :mod:`dqn_atari.envs.base` for the
vector-env contract, :mod:`dqn_atari.envs.atari` for the Atari pipeline and its protocols, and
:mod:`dqn_atari.envs.control` for CartPole and the grid maze.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from dqn_atari.envs.atari import (
    PROTOCOL_FIELDS,
    PROTOCOLS,
    AtariEnv,
    AtariProtocol,
    display_name,
    get_protocol,
    make_atari,
    resolve_game,
)
from dqn_atari.envs.base import VectorEnv, check_keys, derive_episode_seed
from dqn_atari.envs.control import CartPole, GridMaze, make_cartpole, make_maze, maze_layout

_CONTROL_TASKS = {"cartpole": make_cartpole, "maze": make_maze}

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_FIELDS",
    "AtariEnv",
    "AtariProtocol",
    "CartPole",
    "GridMaze",
    "VectorEnv",
    "derive_episode_seed",
    "display_name",
    "env_display_name",
    "is_control_task",
    "get_protocol",
    "make_atari",
    "make_cartpole",
    "make_env",
    "make_maze",
    "maze_layout",
    "resolve_game",
]


def _control_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", re.sub(r"-v\d+$", "", str(name).strip()).lower())


def is_control_task(name: str) -> bool:
    """True for the small control tasks (CartPole, Maze), False for Atari games."""
    return _control_key(name) in _CONTROL_TASKS


def env_display_name(name: str) -> str:
    """The spelling used in run directories: ``CartPole``, ``Maze``, or an Atari game's (``SpaceInvaders``).
    Unknown names raise the same error as :func:`resolve_game`."""
    key = _control_key(name)
    if key in _CONTROL_TASKS:
        return {"cartpole": CartPole.spec_name, "maze": GridMaze.spec_name}[key]
    return display_name(resolve_game(name))


def make_env(
    name: str, num_envs: int = 1, seed: int = 0, training: bool = True, **overrides: Any
) -> VectorEnv:
    """Build any of our envs by name: ``"CartPole"`` and ``"Maze"`` (any case, optional ``-v1``) are the
    control tasks, anything else is an Atari game for :func:`make_atari` (``protocol=`` and protocol
    fields go in ``overrides``). ``training`` only matters for Atari (life-loss terminals)."""
    key = _control_key(name)
    if key in _CONTROL_TASKS:
        factory = _CONTROL_TASKS[key]
        valid = [p for p in inspect.signature(factory).parameters if p not in ("num_envs", "seed")]
        check_keys(overrides, valid, f"option for {name}")
        return factory(num_envs=num_envs, seed=seed, **overrides)
    return make_atari(name, num_envs=num_envs, seed=seed, training=training, **overrides)
