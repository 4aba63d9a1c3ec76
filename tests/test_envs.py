"""Tests of dqn_atari.envs on the real emulator (ale-py) and the real Gymnasium CartPole.

The Atari pipeline is checked pixel for pixel against an independent pipeline written here on top of
``ale_py.ALEInterface``; flags, rewards, seeding, sticky actions and exact save/restore are checked on
scripted or seeded episodes.
"""

from __future__ import annotations

import dataclasses
import json

import ale_py
import cv2
import gymnasium as gym
import numpy as np
import pytest
from ale_py import ALEInterface, roms
from ale_py.vector_env import AtariVectorEnv
from scipy.stats import binomtest

from dqn_atari.envs import (
    PROTOCOLS,
    AtariEnv,
    AtariProtocol,
    CartPole,
    GridMaze,
    derive_episode_seed,
    display_name,
    get_protocol,
    make_atari,
    make_cartpole,
    make_env,
    make_maze,
    maze_layout,
    resolve_game,
)
from dqn_atari.envs import emulators
from dqn_atari.envs.emulators import CxxNoopDraws
from dqn_atari import jit
from dqn_atari.envs import screens as screens_module
from dqn_atari.envs.screens import AreaResize, PaletteGrayscale

INFO_KEYS = {
    "raw_reward", "life_loss", "game_over", "episode_end", "episode_return",
    "episode_length", "episode_frames", "lives", "final_obs",
}  # fmt: skip


# ----- an independent reference pipeline on the raw emulator -----------------------------------------------
def new_ale() -> ALEInterface:
    ale = ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    return ale


def preprocess(gray: np.ndarray) -> np.ndarray:
    return cv2.resize(gray, (84, 84), interpolation=cv2.INTER_AREA)


class ReferencePipeline:
    """Nature-style preprocessing written plainly: 4 frames per step, max of the last two grayscale
    screens, area resize to 84x84, stack of 4 padded with zeros after a reset."""

    def __init__(self, game: str, sticky: float = 0.0) -> None:
        self.rom, self.sticky, self.ale = roms.get_rom_path(game), sticky, new_ale()

    def reset(self, seed: int | None) -> np.ndarray:
        """Reload the ROM with ``seed`` (a seeded reset), or just restart the game when ``seed`` is None."""
        if seed is not None:
            self.ale.setInt("random_seed", seed)
            self.ale.setFloat("repeat_action_probability", self.sticky)
            self.ale.loadROM(self.rom)
        self.ale.reset_game()
        self.actions = self.ale.getMinimalActionSet()
        zeros = np.zeros((84, 84), np.uint8)
        self.stack = [zeros, zeros, zeros, preprocess(self.ale.getScreenGrayscale())]
        return np.stack(self.stack)

    def step(self, action: int) -> tuple[np.ndarray, int, bool, int]:
        reward, screens = 0, []
        for frame in range(4):
            reward += self.ale.act(self.actions[action])
            if self.ale.game_over():  # ALE stops at the terminal frame; the observation is not used then
                break
            if frame >= 2:
                screens.append(self.ale.getScreenGrayscale())
        game_over = self.ale.game_over()
        if not game_over:
            self.stack = self.stack[1:] + [preprocess(np.maximum(*screens))]
        return np.stack(self.stack), reward, game_over, self.ale.lives()


GOLDEN_CASES = {
    # Breakout: life losses and game overs; default reseeding, so games restart without a ROM reload.
    "breakout": dict(game="breakout", sticky=0.0, reseed_interval=10_000, max_episode_frames=108_000),
    # Pong: a small frame cap forces truncations; every episode starts with a seeded ROM reload.
    "pong": dict(game="pong", sticky=0.0, reseed_interval=0, max_episode_frames=1_200),
    # Sticky actions come from ALE's own generator: same seed, same frames as a raw ALE with p=0.25.
    "breakout_sticky": dict(game="breakout", sticky=0.25, reseed_interval=300, max_episode_frames=108_000),
}


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_pixels_match_reference_pipeline(case: str) -> None:
    c = GOLDEN_CASES[case]
    seed, steps = 3, 700
    env = make_atari(
        c["game"], seed=seed, noop_max=0, fire_reset=False, repeat_action_probability=c["sticky"],
        max_episode_frames=c["max_episode_frames"], reseed_interval=c["reseed_interval"],
    )  # fmt: skip
    ref = ReferencePipeline(c["game"], c["sticky"])
    obs, _ = env.reset()
    ref_obs = ref.reset(derive_episode_seed(seed, 0, 0))
    np.testing.assert_array_equal(obs[0], ref_obs)
    rng = np.random.default_rng(0)
    episode, since_reload, ref_lives = 0, 0, ref.ale.lives()
    seen = {"life_loss": 0, "game_over": 0, "truncated": 0}
    for t in range(steps):
        action = int(rng.integers(env.num_actions))
        obs, reward, terminated, truncated, info = env.step(np.array([action]))
        ref_obs, ref_reward, ref_game_over, lives = ref.step(action)
        since_reload += 1
        assert info["raw_reward"][0] == ref_reward, t
        assert info["game_over"][0] == ref_game_over, t
        assert info["life_loss"][0] == (lives < ref_lives), t
        ref_lives = lives
        seen["life_loss"] += info["life_loss"][0]
        seen["game_over"] += ref_game_over
        seen["truncated"] += truncated[0]
        if info["episode_end"][0]:
            if truncated[0]:  # the observation a truncated transition bootstraps from must be exact
                np.testing.assert_array_equal(info["final_obs"][0], ref_obs, err_msg=f"step {t}")
            episode += 1
            reload = since_reload >= c["reseed_interval"]
            ref_obs = ref.reset(derive_episode_seed(seed, 0, episode) if reload else None)
            since_reload = 0 if reload else since_reload
            ref_lives = ref.ale.lives()
        np.testing.assert_array_equal(obs[0], ref_obs, err_msg=f"{case}, step {t}")
    if c["game"] == "breakout":
        assert seen["life_loss"] >= 3 and seen["game_over"] >= 2, seen
    else:
        assert seen["truncated"] >= 2, seen


def test_frame_stack_is_zero_padded_after_reset() -> None:
    env = make_atari("Pong", num_envs=2, seed=1)
    obs, _ = env.reset()
    assert (obs[:, :3] == 0).all() and (obs[:, 3] > 0).any(axis=(1, 2)).all()
    obs2, *_ = env.step(np.zeros(2, np.int64))
    assert (obs2[:, :2] == 0).all()
    np.testing.assert_array_equal(obs2[:, 2], obs[:, 3])


def test_ale_noop_starts_are_0_to_noop_max_minus_1_frames() -> None:
    """The claim in atari.py's docstring: ALE plays U{0..noop_max-1} single NOOP frames at a reset."""
    env = AtariVectorEnv("pong", 4, noop_max=30, use_fire_reset=False)
    env.reset(seed=np.arange(4))
    frames = [env.reset()[1]["episode_frame_number"] for _ in range(75)]  # unseeded: ~10 ms each
    frames = np.concatenate(frames)
    # 300 draws: P(0 or 29 never drawn) < 2 * (29/30)^300 = 8e-5.
    assert frames.min() == 0 and frames.max() == 29 and len(np.unique(frames)) == 30
    env.close()


def test_noop_draws_are_those_of_the_cxx_env() -> None:
    """The in-process backend draws its no-op counts as ale-py's C++ env does (std::mt19937 through libstdc++'s
    uniform_int_distribution): the C++ standard's check value of mt19937, then 200 resets of the real C++ env."""
    draws = CxxNoopDraws(29, seed=5489)  # 5489: std::mt19937's default seed
    assert int(draws._mt.random_raw(10_000)[-1]) == 4123659995  # [rand.predef]: the 10000th output
    env = AtariVectorEnv("pong", 2, noop_max=30, use_fire_reset=False)
    seeds = np.array([3, 2**31 - 1])
    frames = [env.reset(seed=seeds)[1]["episode_frame_number"]]
    frames += [env.reset()[1]["episode_frame_number"] for _ in range(99)]  # unseeded: the generator runs on
    env.close()
    ours = [CxxNoopDraws(29, seed=int(s)) for s in seeds]
    np.testing.assert_array_equal(np.array(frames), [[d.draw() for d in ours] for _ in range(100)])


@pytest.mark.parametrize(
    "height, width, size, fast",
    [(210, 160, 84, True), (210, 160, 64, True), (250, 160, 84, True), (210, 160, 160, True),
     (210, 160, 210, False), (168, 168, 84, False)],  # enlarging, and 2x on both axes: cv2.resize itself
)
def test_area_resize_is_opencv_bit_for_bit(height: int, width: int, size: int, fast: bool) -> None:
    """The in-process backend's pooled resize equals max-pool + cv2.resize(INTER_AREA) exactly, and leaves the
    max in the newest screen; on random screens and on few-valued ones like Atari's (many exact halves)."""
    rng = np.random.default_rng(size)
    resize = AreaResize(height, width, size)
    assert resize.exact_fast == (fast and screens_module.numba is not None)
    out = np.empty((size, size), np.uint8)
    for k in range(200):
        if k % 2:
            newest = rng.integers(0, 256, (height, width), dtype=np.uint8)
        else:
            newest = (rng.integers(0, 3, (height, width)) * rng.integers(1, 128)).astype(np.uint8)
        previous = rng.integers(0, 256, (height, width), dtype=np.uint8) if k % 3 else np.zeros_like(newest)
        pooled = np.maximum(newest, previous)
        resize(newest, previous, out)
        np.testing.assert_array_equal(newest, pooled)
        np.testing.assert_array_equal(out, cv2.resize(pooled, (size, size), interpolation=cv2.INTER_AREA))
    with pytest.raises(ValueError, match="shape"):  # compiled code does not check bounds: we do
        resize(newest, previous, np.empty((size - 1, size), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        resize(newest[:-1], previous[:-1], out)


@pytest.mark.parametrize("game", ["Seaquest", "MsPacman"])
def test_palette_grayscale_is_ales_grayscale(game: str) -> None:
    """The learnt-palette grayscale equals ALE's getScreenGrayscale on every frame of random play (colours
    appear as the game goes on), and finds a colour missing from its table (one entry forgotten) again."""
    ale = ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(roms.get_rom_path(resolve_game(game)))
    height, width = ale.getScreenDims()
    grayscale = PaletteGrayscale(height, width)
    assert grayscale.compiled == (screens_module.numba is not None)
    actions, rng = ale.getMinimalActionSet(), np.random.default_rng(0)
    out = np.empty((height, width), np.uint8)
    for frame in range(1500):
        ale.act(actions[rng.integers(len(actions))])
        if ale.game_over():
            ale.reset_game()
        if frame == 1000:  # forget the most common colour but keep its pairs' entries consistent
            common = np.bincount(ale.getScreen().ravel(), minlength=256).argmax()
            grayscale.table[common] = -1
            grayscale.learn(np.empty((0,), np.uint8), np.empty((0,), np.uint8))
        grayscale(ale, out)
        np.testing.assert_array_equal(out, ale.getScreenGrayscale(), err_msg=f"{game}: frame {frame}")
        if frame == 1000 and grayscale.compiled:
            assert grayscale.table[common] >= 0  # learnt again from ALE
    seen = np.unique(ale.getScreen())
    if grayscale.compiled:
        assert (grayscale.table[seen] >= 0).all()
        with pytest.raises(ValueError, match="shape"):
            grayscale(ale, np.empty((height, width - 1), np.uint8))


@pytest.mark.skipif(screens_module.numba is None, reason="numba not installed: cv2.resize is used anyway")
def test_kernels_compile_where_numba_cannot_cache() -> None:
    """numba refuses to cache a function it has no place to cache for (here: source without a file; also a
    read-only install without a home directory); the kernels then compile without the disk cache."""
    namespace: dict = {}
    exec("def plus_one(x):\n    return x + 1", namespace)
    with pytest.raises(RuntimeError, match="no locator"):
        screens_module.numba.njit(cache=True)(namespace["plus_one"])
    compiled = jit.compiled(namespace["plus_one"])
    assert isinstance(compiled, screens_module.numba.core.registry.CPUDispatcher) and compiled(2) == 3


@pytest.mark.skipif(screens_module.numba is None, reason="numba not installed: cv2.resize is used anyway")
def test_area_resize_falls_back_to_opencv_if_it_differs() -> None:
    """An AreaResize whose compiled path disagrees with cv2.resize (here: one tap weight off by one float32 ulp,
    as an OpenCV with fused multiply-adds could be) is detected by its self-check; the fallback is cv2.resize."""
    resize = AreaResize(210, 160, 84)
    assert resize.agrees_with_opencv()
    weight = resize.x_taps[1]
    weight[5, 0] = np.nextafter(weight[5, 0], np.float32(1))
    with pytest.warns(UserWarning, match="differs"):
        assert not resize.agrees_with_opencv()


BACKEND_CASES = {  # game, envs, steps, overrides: no-op starts everywhere, frequent ROM reloads and episode ends
    "breakout": ("Breakout", 1, 1500, dict(reseed_interval=300)),
    "breakout_sticky_fire_2envs": ("Breakout", 2, 1000, dict(reseed_interval=200, fire_reset=True,
                                                             repeat_action_probability=0.25)),
    "pong_frame_cap": ("Pong", 1, 800, dict(reseed_interval=0, max_episode_frames=1200)),
    "space_invaders_machado": ("SpaceInvaders", 1, 1000, dict(protocol="machado2018", reseed_interval=400)),
}


@pytest.mark.skipif(screens_module.numba is None, reason="numba not installed: ale-py resizes")
def test_threaded_python_resize_follows_cxx_restarts_on_truncation() -> None:
    """The threaded backend's own stacks restart where the C++ env restarts an env by itself (its NextStep
    autoreset, here after its own frame cap, which AtariEnv never lets it reach): equal to the C++ stacks."""
    assert emulators.resize_agrees_with_ale("pong", 84)
    protocol = get_protocol("nature2015", noop_max=0)
    ours = emulators.Threaded("pong", 1, protocol, 1, max_frames=40)
    cxx = AtariVectorEnv("pong", 1, num_threads=1, max_num_frames_per_episode=40, noop_max=0, use_fire_reset=False,
                         reward_clipping=False)
    assert ours.resize_here
    np.testing.assert_array_equal(ours.reset(np.zeros(1, np.int64), None)[0], cxx.reset(seed=np.zeros(1, np.int64))[0])
    for t in range(30):  # 10 steps of 4 frames reach the cap: restarts at steps 10, 21
        ours.send(np.array([t % 3]))
        np.testing.assert_array_equal(ours.recv()[0], cxx.step(np.array([t % 3]))[0], err_msg=f"step {t}")
    ours.close()
    cxx.close()


@pytest.mark.parametrize("resize_here", [True, False], ids=["python_resize", "cxx_resize"])
@pytest.mark.parametrize("case", BACKEND_CASES)
def test_inprocess_and_threaded_backends_give_the_same_episodes(case: str, resize_here: bool, monkeypatch) -> None:
    """Also with the threaded backend resizing in the C++ workers (as on machines of many cores)."""
    game, n, steps, kwargs = BACKEND_CASES[case]
    if not resize_here:
        monkeypatch.setattr(emulators, "RESIZE_HERE_MAX_WORKERS", 0)
    threaded = make_atari(game, num_envs=n, seed=7, backend="threaded", **kwargs)
    assert threaded._emu.resize_here == (resize_here and screens_module.numba is not None)
    inprocess = make_atari(game, num_envs=n, seed=7, backend="inprocess", **kwargs)
    np.testing.assert_array_equal(threaded.reset()[0], inprocess.reset()[0])
    rng = np.random.default_rng(1)
    ends = 0
    for t in range(steps):
        actions = rng.integers(0, threaded.num_actions, n)
        a, b = threaded.step(actions), inprocess.step(actions)
        for x, y, name in zip(a[:4], b[:4], ("obs", "reward", "terminated", "truncated")):
            np.testing.assert_array_equal(x, y, err_msg=f"{case}: {name} at step {t}")
        for key in a[4]:
            np.testing.assert_array_equal(a[4][key], b[4][key], err_msg=f"{case}: info[{key!r}] at step {t}")
        np.testing.assert_array_equal(threaded._frames_at_start, inprocess._frames_at_start)  # no-op counts
        ends += int(a[4]["episode_end"].sum())
    assert ends >= 2, f"{case}: {ends} episode ends; the comparison must cross resets"
    assert threaded.state_dict() == inprocess.state_dict()
    threaded.close()
    inprocess.close()


def test_backend_choice() -> None:
    assert make_atari("Pong").backend == "inprocess"  # one env: no thread hand-offs
    assert make_atari("Pong", num_envs=2).backend == "threaded"
    assert make_atari("Pong", backend="threaded").backend == "threaded"
    with pytest.raises(ValueError, match="backend='gpu' is unknown"):
        make_atari("Pong", backend="gpu")


def test_frame_cap_excludes_noop_frames() -> None:
    env = make_atari("Pong", num_envs=3, seed=0, noop_max=30, max_episode_frames=40)
    env.reset()
    for step in range(1, 31):
        _, _, terminated, truncated, info = env.step(np.zeros(3, np.int64))
        assert (truncated == (step % 10 == 0)).all() and not terminated.any()
    assert (info["episode_frames"] == 40).all() and (info["episode_length"] == 10).all()


# ----- flags, rewards ---------------------------------------------------------------------------------------
def play_scripted(env: AtariEnv, steps: int, action: int) -> list[tuple]:
    env.reset()
    return [env.step(np.full(env.num_envs, action)) for _ in range(steps)]


def test_life_loss_and_game_over_flags_on_scripted_episode() -> None:
    # Breakout with FIRE held: the paddle never moves, so the ball is lost again and again until game over.
    kwargs = dict(seed=5, noop_max=0)
    train = play_scripted(make_atari("Breakout", training=True, **kwargs), 400, action=1)
    evaluate = play_scripted(make_atari("Breakout", training=False, **kwargs), 400, action=1)
    lives = [5]
    for t, (step, step_e) in enumerate(zip(train, evaluate)):
        (obs, rew, term, trunc, info), (obs_e, rew_e, term_e, _, info_e) = step, step_e
        np.testing.assert_array_equal(obs, obs_e)  # training mode changes flags, not the game
        np.testing.assert_array_equal(rew, rew_e)
        assert set(info) == INFO_KEYS and not trunc[0]
        life_lost = info["life_loss"][0]
        assert term[0] == (life_lost or info["game_over"][0])  # Nature: a lost life is terminal in training
        assert term_e[0] == info_e["game_over"][0]  # evaluation: only the game over
        assert info["episode_end"][0] == info["game_over"][0]  # life losses never reset
        if info["game_over"][0]:
            game_over_step = t
            assert life_lost and info["lives"][0] == 5  # the last life goes; the new game has 5
            break
        lives.append(info["lives"][0])
        assert life_lost == (lives[-1] < lives[-2])
    else:
        pytest.fail("no game over in 400 steps of Breakout with FIRE held")
    assert lives[-1] == 1 and sorted(set(lives)) == [1, 2, 3, 4, 5]
    raw = sum(step[4]["raw_reward"][0] for step in train[: game_over_step + 1])
    assert info["episode_return"][0] == raw and info["episode_length"][0] == game_over_step + 1
    # ALE stops inside the last action repeat at the game-over frame.
    assert 4 * game_over_step < info["episode_frames"][0] <= 4 * (game_over_step + 1)
    assert (train[game_over_step][0][0, :3] == 0).all()  # the next episode starts with a padded stack
    assert np.isnan(train[game_over_step - 1][4]["episode_return"][0])


def test_truncation_at_frame_cap() -> None:
    env = make_atari("Breakout", num_envs=2, seed=0, noop_max=0, max_episode_frames=100)
    assert env.protocol.max_episode_frames == 100
    results = play_scripted(env, 60, action=0)  # NOOP: the ball is never served, nothing happens
    for t, (obs, _, term, trunc, info) in enumerate(results, start=1):
        assert (trunc == (t % 25 == 0)).all() and not term.any() and not info["game_over"].any()
        if t % 25 == 0:
            assert (info["episode_length"] == 25).all() and (info["episode_frames"] == 100).all()
            assert (info["episode_return"] == 0).all() and info["episode_end"].all()
            assert (obs[:, :3] == 0).all() and (info["final_obs"][:, :3] > 0).any()
        else:
            assert np.isnan(info["episode_return"]).all() and (info["episode_length"] == 0).all()
    assert make_atari("Pong", max_episode_frames=18_000).protocol.max_episode_frames == 18_000


def test_rewards_clipped_to_sign_and_raw_kept() -> None:
    # Space Invaders pays 5 to 30 points per invader, so raw and clipped rewards differ.
    results = {}
    for clip in (True, False):
        env = make_atari("SpaceInvaders", num_envs=2, seed=2, clip_rewards=clip)
        env.reset()
        rng = np.random.default_rng(0)
        results[clip] = [env.step(rng.integers(0, env.num_actions, 2)) for _ in range(300)]
    raw = np.array([step[4]["raw_reward"] for step in results[True]])
    clipped = np.array([step[1] for step in results[True]])
    unclipped = np.array([step[1] for step in results[False]])
    assert raw.max() > 1 and clipped.dtype == np.float32
    np.testing.assert_array_equal(clipped, np.sign(raw))
    np.testing.assert_array_equal(unclipped, raw)  # same seed: same game; clipping changes only `reward`


# ----- sticky actions ---------------------------------------------------------------------------------------
def decode_sticky_frames(seed: int, steps: int, sticky: float) -> list[int]:
    """For action switches, how many frames kept the previous action, read off our env's observations.

    Our env plays Freeway alternating UP and DOWN: the chicken moves at once, every frame, either way.
    With per-frame stickiness p, a step whose action differs from the previously executed one executes
    the old action for its first K frames, P(K=k) = p^k (1 - p) for k < 4, P(K=4) = p^4. A p=0 raw ALE
    follows our env: from each candidate state it tries K = 0..4 and keeps the branches whose
    preprocessed frame equals ours (candidates with the same emulator state are merged). A step counts
    only if, before it, a single candidate state was left and its 5 branches give 5 different frames:
    that is decided before the step's own random draws, so the counted K are an unbiased sample.
    """
    env = make_atari("Freeway", seed=seed, noop_max=0, repeat_action_probability=sticky)
    obs, _ = env.reset()
    ale = new_ale()
    ale.setInt("random_seed", derive_episode_seed(seed, 0, 0))
    ale.setFloat("repeat_action_probability", 0.0)
    ale.loadROM(roms.get_rom_path("freeway"))
    ale.reset_game()
    np.testing.assert_array_equal(preprocess(ale.getScreenGrayscale()), obs[0, -1])
    actions = ale.getMinimalActionSet()
    up, down = (env.action_meanings.index(name) for name in ("UP", "DOWN"))
    candidates = [(ale.cloneState(), 0)]  # (emulator state, last executed action index)
    decoded: list[int] = []
    for t in range(steps):
        action = up if t % 2 == 0 else down
        obs, *_ = env.step(np.array([action]))
        alive: dict[tuple, tuple] = {}
        for state, previous in candidates:
            frames, match = set(), None
            for k in range(5) if action != previous else [0]:
                ale.restoreState(state)
                screens = []
                for frame in range(4):
                    ale.act(actions[previous if frame < k else action])
                    if frame >= 2:
                        screens.append(ale.getScreenGrayscale())
                frame84 = preprocess(np.maximum(*screens))
                frames.add(frame84.tobytes())
                if np.array_equal(frame84, obs[0, -1]):
                    match, new_state = k, ale.cloneState()
                    executed = previous if k == 4 else action
                    alive[(new_state.serialize(), executed)] = (new_state, executed)
            if len(candidates) == 1 and len(frames) == 5:
                decoded.append(match)
        assert alive, f"no sticky-action pattern explains our env's frame at step {t}"
        candidates = list(alive.values())
    return decoded


def test_sticky_actions_repeat_previous_action_at_configured_rate() -> None:
    """Significance: under H0 (ALE's per-frame stickiness p=0.25 reaches the emulator) the number of
    counted switches whose first frame kept the old action is Binomial(n, 0.25) with n ~ 600
    (sd 0.018), and among those the number that kept it for a second frame too is Binomial(m, 0.25).
    Each two-sided exact test fails below p-value 1e-3: a false alarm rate of 0.1 % per test for a
    correct pipeline, while p off by 0.08 or more is rejected with power >= 0.9 and stickiness per
    agent step instead of per frame (K always 0 or 4) fails the second test for certain. Control: with
    p=0 no switch may stick at all."""
    decoded = np.array([k for seed in range(3) for k in decode_sticky_frames(seed, 230, 0.25)])
    n, stuck, stuck_twice = len(decoded), int((decoded >= 1).sum()), int((decoded >= 2).sum())
    assert n >= 500, n
    assert binomtest(stuck, n, 0.25).pvalue > 1e-3, (stuck, n)
    assert binomtest(stuck_twice, stuck, 0.25).pvalue > 1e-3, (stuck_twice, stuck)
    control = decode_sticky_frames(0, 60, 0.0)
    assert len(control) >= 20 and not any(control), control  # control: without stickiness K is always 0


# ----- seeding ----------------------------------------------------------------------------------------------
def rollout(env, steps: int, action_seed: int = 0, reset_seed: int | None = None) -> list[tuple]:
    out = [env.reset(seed=reset_seed)]
    rng = np.random.default_rng(action_seed)
    out += [env.step(rng.integers(0, env.num_actions, env.num_envs)) for _ in range(steps)]
    return out


def assert_same_rollout(a: list[tuple], b: list[tuple]) -> None:
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        for u, v in zip(x, y, strict=True):
            if isinstance(u, dict):
                assert u.keys() == v.keys()
                for key in u:
                    if key == "final_obs":  # only rows of envs that ended are specified
                        ended = u["episode_end"]
                        np.testing.assert_array_equal(u[key][ended], v[key][ended], err_msg=f"{key} step {t}")
                    else:
                        np.testing.assert_array_equal(u[key], v[key], err_msg=f"{key} step {t}")
            else:
                np.testing.assert_array_equal(u, v, err_msg=f"step {t}")


def test_same_seed_same_actions_same_everything() -> None:
    kwargs = dict(num_envs=2, repeat_action_probability=0.25, max_episode_frames=600)
    first = rollout(make_atari("Breakout", seed=7, **kwargs), 200)
    assert_same_rollout(first, rollout(make_atari("Breakout", seed=7, **kwargs), 200))
    other = rollout(make_atari("Breakout", seed=8, **kwargs), 200)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    assert any(not np.array_equal(step[0][0], step[0][1]) for step in first)  # envs of a batch differ
    # reset(seed) restarts the run; reset() moves every env on to its next episode.
    env = make_atari("Breakout", seed=9, **kwargs)
    again = rollout(env, 50, reset_seed=7)
    assert_same_rollout(first[:51], again)
    assert env.reset()[1]["episode_index"].tolist() == [1, 1]


# ----- names and protocols ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, rom",
    [
        ("Breakout", "breakout"), ("breakout", "breakout"), ("BreakoutNoFrameskip-v4", "breakout"),
        ("ALE/Breakout-v5", "breakout"), ("SpaceInvaders", "space_invaders"),
        ("space_invaders", "space_invaders"), ("Space Invaders", "space_invaders"),
        ("MsPacmanDeterministic-v4", "ms_pacman"), ("ALE/Pong-v5", "pong"), ("TicTacToe3D", "tic_tac_toe_3d"),
    ],
)  # fmt: skip
def test_resolve_game_spellings(name: str, rom: str) -> None:
    assert resolve_game(name) == rom


def test_display_names_round_trip_for_every_rom() -> None:
    for rom in roms.get_all_rom_ids():
        assert resolve_game(display_name(rom)) == rom
    assert display_name("space_invaders") == "SpaceInvaders"


def test_unknown_game_lists_closest_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown Atari game 'Breakot'.*Breakout \(breakout\)") as err:
        resolve_game("Breakot")
    assert str(err.value).count("(") >= 5  # five suggestions, each "Name (id)"
    with pytest.raises(ValueError, match="SpaceInvaders"):
        make_env("SpaceInvader")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_game("")


def test_protocol_presets_and_overrides() -> None:
    nature, machado = PROTOCOLS["nature2015"], PROTOCOLS["machado2018"]
    assert (nature.noop_max, nature.repeat_action_probability, nature.full_action_space) == (30, 0.0, False)
    assert nature.terminal_on_life_loss and nature.clip_rewards and not nature.fire_reset
    assert (machado.repeat_action_probability, machado.full_action_space, machado.terminal_on_life_loss) == (
        0.25, True, False,
    )  # fmt: skip
    assert "Mnih" in nature.description and "Machado" in machado.description
    with pytest.raises(dataclasses.FrozenInstanceError):
        nature.noop_max = 0  # type: ignore[misc]
    changed = get_protocol("nature2015", noop_max=0)
    assert changed.noop_max == 0 and "noop_max=0" in changed.description and nature.noop_max == 30
    assert get_protocol("nature2015", noop_max=30) is nature  # no change, no note
    with pytest.raises(ValueError, match="Did you mean 'noop_max'"):
        get_protocol("nature2015", noop_maxx=3)
    with pytest.raises(ValueError, match="Did you mean 'repeat_action_probability'"):
        make_atari("Pong", repeat_action_prob=0.25)
    with pytest.raises(ValueError, match="Did you mean 'max_episode_frames'"):
        make_env("Pong", max_episode_frame=100)
    with pytest.raises(ValueError, match="nature2015"):
        get_protocol("nature")
    with pytest.raises(ValueError, match="frame_skip"):
        get_protocol("nature2015", frame_skip=0)
    with pytest.raises(ValueError, match="description"):
        get_protocol("nature2015", description="x")  # metadata is not an override
    assert make_atari("Breakout", protocol="machado2018").num_actions == 18
    small = AtariProtocol(frame_stack=2, screen_size=42)
    assert make_atari("Breakout", protocol=small).obs_shape == (2, 42, 42)


# ----- exact save / restore ---------------------------------------------------------------------------------
def check_resume(make, before: int, after: int, action_seed: int = 0) -> dict:
    """Run A for ``before`` steps, snapshot through JSON, go on; B restored from the snapshot must match."""
    a = make()
    a.reset()
    rng = np.random.default_rng(action_seed)
    actions = rng.integers(0, a.num_actions, (before + after, a.num_envs))
    ends_before = sum(a.step(actions[t])[4]["episode_end"].sum() for t in range(before))
    state = json.loads(json.dumps(a.state_dict()))
    continued = [a.step(actions[t]) for t in range(before, before + after)]
    b = make()
    b.load_state_dict(state)
    resumed = [b.step(actions[t]) for t in range(before, before + after)]
    assert_same_rollout(continued, resumed)
    ends_after = sum(step[4]["episode_end"].sum() for step in continued)
    assert ends_before >= 1 and ends_after >= 1, (ends_before, ends_after)
    assert b.state_dict() == a.state_dict()
    return state


@pytest.mark.parametrize("num_envs, reseed_interval", [(1, 0), (3, 150)])
def test_atari_state_restore_is_exact(num_envs: int, reseed_interval: int) -> None:
    # Sticky actions and no-op starts on, a small frame cap for several episode ends per env.
    def make() -> AtariEnv:
        return make_atari(
            "Breakout", num_envs=num_envs, seed=11, repeat_action_probability=0.25,
            max_episode_frames=400, reseed_interval=reseed_interval,
        )  # fmt: skip

    state = check_resume(make, before=170, after=150)
    recorded = [len(actions) for actions in state["backend"]["actions"]]
    if reseed_interval:  # some replay crosses an episode end restarted without a ROM reload
        assert any(n > length for n, length in zip(recorded, state["episode_length"]))
    else:
        assert recorded == state["episode_length"]


def test_state_restore_rejects_mismatches() -> None:
    env = make_atari("Breakout", seed=1)
    env.reset()
    env.step(np.array([1]))
    state = env.state_dict()
    with pytest.raises(ValueError, match="game: saved 'breakout', here 'pong'"):
        make_atari("Pong", seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="noop_max"):
        make_atari("Breakout", seed=1, noop_max=0).load_state_dict(state)
    state["backend"]["obs_crc32"][0] ^= 1
    with pytest.raises(RuntimeError, match="did not reproduce"):
        make_atari("Breakout", seed=1).load_state_dict(state)
    fresh = make_atari("Breakout", seed=4)
    fresh.load_state_dict(make_atari("Breakout", seed=3).state_dict())  # never reset: only the seed
    assert fresh.seed == 3


# ----- the vector-env contract, all kinds ------------------------------------------------------------------
ALL_ENVS = {
    "atari": lambda n: make_env("Breakout", num_envs=n),
    "cartpole": lambda n: make_env("CartPole-v1", num_envs=n),
    "maze": lambda n: make_env("maze", num_envs=n),
}


@pytest.mark.parametrize("kind", ALL_ENVS)
def test_vector_env_contract(kind: str) -> None:
    env = ALL_ENVS[kind](2)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, np.int64))
    obs, info = env.reset()
    assert obs.shape == (2, *env.obs_shape) and obs.dtype == env.obs_dtype
    assert env.obs_shape[0] == env.frame_stack and len(env.action_meanings) == env.num_actions
    assert isinstance(env.spec_name, str) and env.seed == 0 and info["lives"].shape == (2,)
    obs, reward, terminated, truncated, info = env.step(np.ones(2, np.int64))
    assert obs.shape == (2, *env.obs_shape) and reward.dtype == np.float32
    assert terminated.dtype == truncated.dtype == bool and set(info) == INFO_KEYS
    assert all(len(v) == 2 for v in info.values())
    for bad in (np.zeros(3, np.int64), np.zeros(2, np.float32), np.array([0, env.num_actions])):
        with pytest.raises(ValueError, match="actions"):
            env.step(bad)
    env.close()


# ----- control tasks ----------------------------------------------------------------------------------------
def test_cartpole_matches_gymnasium_cartpole_v1() -> None:
    env = make_cartpole(num_envs=1, seed=4)
    assert isinstance(env, CartPole) and env.obs_shape == (1, 4) and env.obs_dtype == np.float32
    ref = gym.make("CartPole-v1")
    obs, _ = env.reset()
    episode = 0
    ref_obs, _ = ref.reset(seed=derive_episode_seed(4, 0, episode))
    rng = np.random.default_rng(0)
    for t in range(200):  # random play falls every ~20 steps: several autoresets
        action = int(rng.integers(2))
        obs, reward, terminated, truncated, info = env.step(np.array([action]))
        ref_obs, ref_reward, ref_term, ref_trunc, _ = ref.step(action)
        assert (reward[0], terminated[0], truncated[0]) == (ref_reward, ref_term, ref_trunc), t
        if terminated[0] or truncated[0]:
            np.testing.assert_array_equal(info["final_obs"][0, 0], ref_obs)
            episode += 1
            ref_obs, _ = ref.reset(seed=derive_episode_seed(4, 0, episode))
        np.testing.assert_array_equal(obs[0, 0], ref_obs)
    assert episode >= 5


def test_cartpole_truncates_at_max_episode_steps() -> None:
    env = make_cartpole(num_envs=4, seed=0, max_episode_steps=5)
    env.reset()
    for t in range(1, 11):
        _, _, terminated, truncated, info = env.step(np.array([0, 1, 0, 1]))
        assert not terminated.any() and (truncated == (t % 5 == 0)).all()  # the pole cannot fall in 5 steps
    assert (info["episode_return"] == 5).all() and (info["episode_length"] == 5).all()


def shortest_path(size: int) -> list[int]:
    """Breadth-first search over maze_layout(size) from the top-left to the bottom-right corner."""
    walls, moves = maze_layout(size), [(-1, 0), (1, 0), (0, -1), (0, 1)]  # UP, DOWN, LEFT, RIGHT
    paths, frontier = {(0, 0): []}, [(0, 0)]
    while frontier:
        (r, c), frontier = frontier[0], frontier[1:]
        for action, (dr, dc) in enumerate(moves):
            cell = (r + dr, c + dc)
            if 0 <= cell[0] < size and 0 <= cell[1] < size and not walls[cell] and cell not in paths:
                paths[cell] = paths[(r, c)] + [action]
                frontier.append(cell)
    return paths[(size - 1, size - 1)]


def test_maze_layout_and_goal() -> None:
    walls = maze_layout(5)
    assert walls.sum() == 8 and not walls[4, 1] and not walls[0, 3] and not walls[0, 0] and not walls[4, 4]
    env = make_maze(num_envs=2, size=5, max_episode_steps=50)
    assert isinstance(env, GridMaze) and env.obs_shape == (1, 25)
    obs, _ = env.reset()
    assert obs[0, 0, 0] == 1 and obs.sum() == 2
    obs, reward, *_ = env.step(np.array([3, 2]))  # RIGHT into the wall, LEFT off the grid: no move
    assert obs[:, 0, 0].tolist() == [1, 1] and (reward == 0).all()
    env.reset()
    path = shortest_path(5)
    assert len(path) == 16
    for t, action in enumerate(path):
        obs, reward, terminated, truncated, info = env.step(np.array([action, 0]))  # env 1 bumps into the top
        assert terminated[0] == (t == len(path) - 1) and reward[0] == terminated[0] and not terminated[1]
    assert info["final_obs"][0, 0, 24] == 1 and obs[0, 0, 0] == 1 and info["episode_return"][0] == 1.0
    for _ in range(50 - len(path)):
        _, _, _, truncated, _ = env.step(np.array([0, 0]))
    assert truncated[1] and not truncated[0]


def test_maze_layouts_are_solvable() -> None:
    for size in range(2, 10):
        env = make_maze(size=size, max_episode_steps=10 * size * size)
        env.reset()
        rewards = [env.step(np.array([a]))[1][0] for a in shortest_path(size)]
        assert rewards[-1] == 1.0 and sum(rewards) == 1.0, size


@pytest.mark.parametrize("name", ["cartpole", "maze"])
def test_control_state_restore_is_exact(name: str) -> None:
    check_resume(lambda: make_env(name, num_envs=3, seed=5, max_episode_steps=30), before=40, after=60)


def test_make_env_dispatch_and_errors() -> None:
    assert isinstance(make_env("CartPole", max_episode_steps=10), CartPole)
    assert isinstance(make_env("Maze", size=4), GridMaze)
    evaluation = make_env("ALE/Pong-v5", num_envs=2, seed=3, training=False, protocol="machado2018")
    assert isinstance(evaluation, AtariEnv) and not evaluation.training and evaluation.spec_name == "Pong"
    with pytest.raises(ValueError, match="Did you mean 'max_episode_steps'"):
        make_env("cartpole", max_episode_step=10)
    with pytest.raises(ValueError, match="size"):
        make_env("maze", size=1)
