"""Environments: Atari 2600 games under named protocols, and small control tasks with the same interface.

The trainer builds every environment with :func:`make_env`; see :mod:`dqn_atari.envs.base` for the
vector-env contract, :mod:`dqn_atari.envs.atari` for the Atari pipeline and its protocols, and
:mod:`dqn_atari.envs.control` for CartPole, the grid maze and n-bit flipping (``BitFlip10``: the
number of bits is part of the name, so runs with different n get different run directories).
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
from dqn_atari.envs.control import (
    BitFlip, CartPole, GridMaze, make_bitflip, make_cartpole, make_maze, maze_layout,
)

_CONTROL_TASKS = {"cartpole": make_cartpole, "maze": make_maze, "bitflip": make_bitflip}

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_FIELDS",
    "AtariEnv",
    "AtariProtocol",
    "BitFlip",
    "CartPole",
    "GridMaze",
    "VectorEnv",
    "derive_episode_seed",
    "display_name",
    "env_display_name",
    "is_control_task",
    "get_protocol",
    "make_atari",
    "make_bitflip",
    "make_cartpole",
    "make_env",
    "make_maze",
    "maze_layout",
    "resolve_game",
]


def _control_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", re.sub(r"-v\d+$", "", str(name).strip()).lower())


def _control_task(name: str) -> tuple[str, dict[str, int]] | None:
    """(task key, options taken from the name) for a control task, None for anything else.
    ``BitFlip10`` (any case, ``bitflip-10``, ``bitflip_10``) is bit flipping with ``n_bits=10``."""
    key = _control_key(name)
    if key in _CONTROL_TASKS and key != "bitflip":
        return key, {}
    bits = re.fullmatch(r"bitflip(\d*)", key)
    if bits is None:
        return None
    if not bits.group(1):
        raise ValueError(f"{name!r}: put the number of bits in the name, e.g. BitFlip10 for 10 bits.")
    return "bitflip", {"n_bits": int(bits.group(1))}


def is_control_task(name: str) -> bool:
    """True for the small control tasks (CartPole, Maze, BitFlipN), False for Atari games."""
    return _control_task(name) is not None


def env_display_name(name: str) -> str:
    """The spelling used in run directories: ``CartPole``, ``Maze``, ``BitFlip10``, or an Atari game's
    (``SpaceInvaders``). Unknown names raise the same error as :func:`resolve_game`."""
    task = _control_task(name)
    if task is not None:
        key, options = task
        return {"cartpole": CartPole.spec_name, "maze": GridMaze.spec_name}.get(key, f"BitFlip{options.get('n_bits')}")
    return display_name(resolve_game(name))


def make_env(
    name: str, num_envs: int = 1, seed: int = 0, training: bool = True, **overrides: Any
) -> VectorEnv:
    """Build any of our envs by name: ``"CartPole"``, ``"Maze"`` and ``"BitFlip<n>"`` (any case, optional
    ``-v1``) are the control tasks, anything else is an Atari game for :func:`make_atari` (``protocol=`` and
    protocol fields go in ``overrides``). ``training`` only matters for Atari (life-loss terminals)."""
    task = _control_task(name)
    if task is not None:
        key, options = task
        factory = _CONTROL_TASKS[key]
        valid = [p for p in inspect.signature(factory).parameters if p not in ("num_envs", "seed", *options)]
        check_keys(overrides, valid, f"option for {name}")
        return factory(num_envs=num_envs, seed=seed, **options, **overrides)
    return make_atari(name, num_envs=num_envs, seed=seed, training=training, **overrides)
