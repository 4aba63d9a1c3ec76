"""The two ways :class:`~dqn_atari.envs.atari.AtariEnv` runs its emulators; both compute the same observations.

- :class:`Threaded`: ale-py's C++ ``AtariVectorEnv``, one worker thread per env (up to the cores). The envs of
  a batch, and the one-env envs of K runs trained in one process, step in parallel while Python waits.
- :class:`InProcess`: the same preprocessing written out in Python over ``ale_py.ALEInterface``, stepped in
  the calling thread. For a single env this is faster: a step of the threaded env hands the action to a
  worker thread and the result back, and on a small virtual machine those two wake-ups cost as much as the
  preprocessing itself (``scripts/bench_env.py``: ``ale_vector_1`` against ``raw_preprocessed``).

:class:`InProcess` follows ale-py's ``src/ale/vector/preprocessed_env.cpp`` (0.12) line by line: the reset
(seeded: reload the ROM and reseed; FIRE for one frame if asked; no-op frames drawn from the env's own
``std::mt19937`` through ``std::uniform_int_distribution``; zeroed stack), the frame skip that stops at a
game over, the two grayscale screens captured at the last two frames into two buffers that are max-pooled in
place (so a step cut short by a game over pools stale screens, as in C++), OpenCV's area resize, and the
frame stack. Its no-op draws reproduce libstdc++'s generator and distribution bit for bit
(:class:`CxxNoopDraws`), so both backends give the same episodes from the same seeds: ``tests/test_envs.py``
steps them side by side with no-op starts, sticky actions and FIRE resets and compares every observation.
The grayscale screens and the resize are computed by :mod:`dqn_atari.envs.screens`, bit for bit as ALE and
OpenCV compute them, in about half their time.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import numpy as np
from ale_py import Action, ALEInterface, LoggerMode, roms
from ale_py.vector_env import AtariVectorEnv

from dqn_atari.envs.screens import AreaResize, PaletteGrayscale

_MASK32 = 0xFFFF_FFFF


class CxxNoopDraws:
    """``std::uniform_int_distribution<int>(0, high)(std::mt19937)`` as libstdc++ (GCC >= 11) computes it.

    NumPy's MT19937, given the state ``std::mt19937(seed)`` starts from, yields the same raw 32-bit outputs
    (``tests/test_envs.py`` checks the C++ standard's 10,000th value). libstdc++ maps them to ``[0, high]`` with
    Lemire's nearly divisionless method: ``(x * range) >> 32``, redrawing while the low 32 bits fall below
    ``2**32 mod range``.
    """

    def __init__(self, high: int, seed: int = 0):
        self.range = int(high) + 1
        self.seed(seed)

    def seed(self, seed: int) -> None:
        key = np.empty(624, np.uint32)  # std::mt19937(seed): Matsumoto and Nishimura's init_genrand
        x = int(seed) & _MASK32
        for i in range(624):
            key[i] = x
            x = (1812433253 * (x ^ (x >> 30)) + i + 1) & _MASK32
        self._mt = np.random.MT19937()
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}

    def _next(self) -> int:
        return int(self._mt.random_raw())

    def draw(self) -> int:
        product = self._next() * self.range
        low = product & _MASK32
        if low < self.range:
            threshold = (2**32 - self.range) % self.range  # C++'s -range % range in uint32 arithmetic
            while low < threshold:
                product = self._next() * self.range
                low = product & _MASK32
        return product >> 32


#: Every ALE game's screen (height, width).
SCREEN = (210, 160)
#: Threaded resizes in the calling thread when at most this many worker threads run at once (below). Per env
#: step, OpenCV's resize costs the C++ workers ~35 us and ours the calling thread ~9 us: moving it pays while
#: the workers number fewer than 35 / 9.
RESIZE_HERE_MAX_WORKERS = 3


@functools.cache
def resize_agrees_with_ale(game: str, size: int) -> bool:
    """Whether :class:`AreaResize` gives the pixels of ale-py's own OpenCV (linked into ale-py, not the pip
    ``cv2`` that AreaResize checks itself against): 30 steps of one env at full size and at ``size`` from the
    same seed, compared frame by frame. Once per process and game (~0.1 s)."""
    resize = AreaResize(*SCREEN, size)
    kwargs = dict(num_threads=1, noop_max=0, use_fire_reset=False, reward_clipping=False, stack_num=1)
    full = AtariVectorEnv(game, 1, img_height=SCREEN[0], img_width=SCREEN[1], **kwargs)
    small = AtariVectorEnv(game, 1, img_height=size, img_width=size, **kwargs)
    try:
        screens, frames = full.reset(seed=0)[0], small.reset(seed=0)[0]
        out = np.empty((size, size), np.uint8)
        for action in np.random.default_rng(0).integers(0, full.single_action_space.n, 30):
            resize.resize(screens[0, 0], out)
            if not np.array_equal(out, frames[0, 0]):
                warnings.warn(f"dqn_atari.envs.emulators: this ale-py's OpenCV resizes {game} differently from "
                              f"cv2; the threaded backend lets ale-py resize.")
                return False
            screens, frames = full.step(np.array([action]))[0], small.step(np.array([action]))[0]
    finally:
        full.close()
        small.close()
    return True


class Threaded:
    """ale-py's ``AtariVectorEnv`` (C++ worker threads) behind the small interface AtariEnv uses.

    With at most :data:`RESIZE_HERE_MAX_WORKERS` workers at once (few cores or few envs), the workers return
    the pooled grayscale screens at full size (ale-py then copies instead of resizing) and the calling thread
    resizes them with :class:`AreaResize`, the same pixels in a quarter of the time, and stacks them as the
    C++ env does (zeros after a reset): with two cores, 8 envs step ~7 % faster. Elsewhere (more workers, no
    numba, or an ale-py whose own OpenCV computes other pixels: :func:`resize_agrees_with_ale`) the C++ env
    does it all."""

    def __init__(self, game: str, num_envs: int, protocol: Any, num_threads: int, max_frames: int):
        self.resize_here = False
        if min(num_threads, os.cpu_count() or 1) <= RESIZE_HERE_MAX_WORKERS:
            self.resize = AreaResize(*SCREEN, protocol.screen_size)
            self.resize_here = self.resize.exact_fast and resize_agrees_with_ale(game, protocol.screen_size)
        size = SCREEN if self.resize_here else (protocol.screen_size, protocol.screen_size)
        self._env = AtariVectorEnv(
            game, num_envs, num_threads=num_threads, max_num_frames_per_episode=max_frames,
            repeat_action_probability=protocol.repeat_action_probability,
            full_action_space=protocol.full_action_space, img_height=size[0], img_width=size[1],
            grayscale=True, stack_num=1 if self.resize_here else protocol.frame_stack,
            frameskip=protocol.frame_skip, maxpool=True, noop_max=protocol.noop_max, episodic_life=False,
            life_loss_info=False, reward_clipping=False, use_fire_reset=protocol.fire_reset,
        )  # fmt: skip
        self._strength = np.ones(num_envs, np.float32)  # full paddle strength, as AtariVectorEnv.step
        self.action_set = list(self._env.ale.get_action_set())
        self.stack = np.zeros((num_envs, protocol.frame_stack, protocol.screen_size, protocol.screen_size), np.uint8)
        # Envs whose episode ended at the last step: the C++ env restarts them at their next one (NextStep
        # autoreset), unless reset first (AtariEnv always does, and it truncates before the C++ env would).
        self._restart = np.zeros(num_envs, bool)

    def _stacked(self, screens: np.ndarray, envs: np.ndarray, restarted: np.ndarray) -> np.ndarray:
        """Push the resized ``screens[i]`` of the ``envs`` onto their stacks (zeroed first where ``restarted``)
        and return a copy of all stacks; the C++ env's own stacks where it resizes itself."""
        if not self.resize_here:
            return screens
        for i in np.flatnonzero(envs).tolist():
            stack = self.stack[i]
            if restarted[i]:
                stack[:] = 0
            else:
                stack[:-1] = stack[1:]
            self.resize.resize(screens[i, 0], stack[-1])
        return self.stack.copy()

    def reset(self, seeds: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reset the envs in ``mask`` (all if None), reseeding those with a seed >= 0; returns obs, episode frame
        numbers and lives of all envs."""
        if mask is None:
            obs, info = self._env.reset(seed=seeds)
            mask = np.ones(len(self.stack), bool)
        else:
            obs, info = self._env.reset(seed=seeds[mask], options={"reset_mask": mask})
        self._restart[mask] = False
        return self._stacked(obs, mask, mask), info["episode_frame_number"], info["lives"]

    def send(self, actions: np.ndarray) -> None:
        # Straight to the C++ interface: AtariVectorEnv.step only re-checks the actions (AtariEnv does) and
        # allocates paddle strengths, ~40 us per step.
        self._env.ale.send(actions, self._strength)

    def recv(self) -> tuple[np.ndarray, ...]:
        """obs, raw reward, game over, episode frame number and lives of every env."""
        obs, reward, game_over, truncated, info = self._env.ale.recv()
        obs = self._stacked(obs, np.ones(len(self.stack), bool), self._restart)
        self._restart = game_over | truncated  # is_episode_over(): the C++ env restarts these at their next step
        return obs, reward, game_over, info["episode_frame_number"], info["lives"]

    def close(self) -> None:
        self._env.close()  # the C++ destructor joins the worker threads


class InProcess:
    """The C++ env's preprocessing in Python, stepped in the calling thread (module docstring)."""

    def __init__(self, game: str, num_envs: int, protocol: Any, max_frames: int):
        self._rom = roms.get_rom_path(game)
        p = protocol
        self.frame_skip, self.max_frames = p.frame_skip, max_frames
        self.size = (p.screen_size, p.screen_size)
        self.ales: list[ALEInterface] = []
        for _ in range(num_envs):
            ale = ALEInterface()
            ale.setLoggerMode(LoggerMode.Error)
            ale.setFloat("repeat_action_probability", p.repeat_action_probability)
            ale.setInt("random_seed", 0)  # AtariEnv's first reset is seeded and reloads the ROM
            ale.loadROM(self._rom)
            self.ales.append(ale)
        ale = self.ales[0]
        self.action_set = list(ale.getLegalActionSet() if p.full_action_space else ale.getMinimalActionSet())
        self.fire = bool(p.fire_reset) and Action.FIRE in self.action_set
        height, width = ale.getScreenDims()
        self.resize = AreaResize(height, width, p.screen_size)
        self.grayscale = PaletteGrayscale(height, width)  # one ROM, one palette
        # Per env, the grayscale screens of the last two frames of a step: (newest, the one before).
        self.screens = [(np.zeros((height, width), np.uint8), np.zeros((height, width), np.uint8))
                        for _ in range(num_envs)]
        self.stack = np.zeros((num_envs, p.frame_stack, *self.size), np.uint8)
        self.noops = [CxxNoopDraws(max(p.noop_max - 1, 0)) for _ in range(num_envs)]
        self.elapsed = [0] * num_envs  # frames since the reset, as C++ elapsed_steps_
        self.game_over = [False] * num_envs
        self._pending: np.ndarray | None = None

    def _process_screen(self, i: int) -> None:
        stack = self.stack[i]
        stack[:-1] = stack[1:]
        self.resize(*self.screens[i], stack[-1])  # pools in place, as C++ maxpool_frames

    def _reset_one(self, i: int, seed: int) -> None:
        ale = self.ales[i]
        if seed >= 0:
            ale.setInt("random_seed", int(seed))
            self.noops[i].seed(seed)
            ale.loadROM(self._rom)
        ale.reset_game()
        if self.fire:
            ale.act(Action.FIRE)
        noops = self.noops[i].draw() - int(self.fire)
        for _ in range(noops):
            ale.act(Action.NOOP)
            if ale.game_over():
                ale.reset_game()
        self.stack[i] = 0
        self.grayscale(ale, self.screens[i][0])
        self.screens[i][1][:] = 0
        self._process_screen(i)
        self.elapsed[i] = 0
        self.game_over[i] = False

    def _step_one(self, i: int, action: Action) -> int:
        ale, screens, grayscale = self.ales[i], self.screens[i], self.grayscale
        reward, over, elapsed = 0, False, self.elapsed[i]
        for skip in range(self.frame_skip, 0, -1):
            reward += ale.act(action)
            over = ale.game_over()
            elapsed += 1
            if over or elapsed >= self.max_frames:
                break
            if skip <= 2:  # the last two frames, the newest into screens[0]
                grayscale(ale, screens[skip - 1])
        self.elapsed[i], self.game_over[i] = elapsed, over
        self._process_screen(i)
        return reward

    def _info(self) -> tuple[np.ndarray, np.ndarray]:
        frames = np.array([ale.getEpisodeFrameNumber() for ale in self.ales], np.int64)
        return frames, np.array([ale.lives() for ale in self.ales], np.int64)

    def reset(self, seeds: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        for i in range(len(self.ales)):
            if mask is None or mask[i]:
                self._reset_one(i, int(seeds[i]))
        return (self.stack.copy(), *self._info())

    def send(self, actions: np.ndarray) -> None:
        self._pending = actions

    def recv(self) -> tuple[np.ndarray, ...]:
        actions, self._pending = self._pending, None
        reward = []
        for i, a in enumerate(actions.tolist()):
            if self.game_over[i] or self.elapsed[i] >= self.max_frames:
                self._reset_one(i, -1)  # C++ NextStep autoreset (game_over[i] is then False); AtariEnv
                reward.append(0)  # resets ended envs itself first
            else:
                reward.append(self._step_one(i, self.action_set[a]))
        return (self.stack.copy(), np.array(reward, np.int64), np.array(self.game_over), *self._info())

    def close(self) -> None:
        self.ales = []
