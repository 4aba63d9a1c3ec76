"""Hindsight experience replay (Andrychowicz et al. 2017, "Hindsight Experience Replay", NeurIPS) on the same
per-env frame ring as uniform replay.

Goal-conditioned observations are ``s || g``: ``goal_size`` state entries, then ``goal_size`` goal entries, and
the goal a state achieves is the state itself (m(s) = s, the paper's bit-flipping setting, Sec. 3.2). The
reward is the paper's sparse one, r(s, a, g) = -[m(s') != g] (Sec. 4.1, "Rewards").

Algorithm 1 stores each transition once with the episode's goal and once more for each of the goals a strategy
S picks from the episode. Here the ring stores every transition once, as it came, and the hindsight copies are
made when a batch is sampled (as OpenAI's released HER code does): a sampled transition keeps its goal with
probability 1 / (k + 1) and otherwise gets a goal drawn by the strategy, so the replayed data has the same mix
as Algorithm 1's buffer, k relabelled copies for each original, without storing k + 1 copies. Strategies
(Sec. 4.5):

- ``final``: the state the episode ended in, m(s_T). One goal per transition (k is 1 whatever ``k`` says):
  half of the replayed transitions are relabelled, as in Sec. 3.1 ("we replace g in the replay buffer by s_T.
  In addition we can still replay with the original goal").
- ``future``: a state observed after the transition, s_{t+1} ... s_T, uniformly (k = 4 in Fig. 3).
- ``episode``: any state of the transition's episode, s_0 ... s_T, uniformly.

Only transitions of finished episodes are sampled (Algorithm 1 stores an episode after it has ended): each
slot's episode end is found by looking ahead in its ring for the final-frame slot that the ring writes when an
episode ends, at most ``max_episode_steps`` slots away. Nothing is stored beyond the ring's own arrays, so
save/load and checkpoints work unchanged (the relabelling draws come from the buffer's saved RNG).
The relabelled reward and goals replace the stored ones in the batch; the discount is kept, since the paper
bootstraps through every transition ("gamma = 0.98 for all transitions including the ones ending an episode",
Appendix A).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dqn_atari.replay.uniform import Batch, ReplayBuffer

__all__ = ["HER_STRATEGIES", "HindsightReplayBuffer"]

HER_STRATEGIES = ("final", "future", "episode")


class HindsightReplayBuffer(ReplayBuffer):
    """ReplayBuffer whose batches are relabelled with hindsight goals; same ``add``, ``sample(batch_size)``.

    ``goal_size``: entries of the state (and of the goal) in each ``s || g`` observation.
    ``max_episode_steps``: the env's episode length cap, how far ahead an episode's end is looked for.
    """

    def __init__(self, *args: Any, strategy: str = "future", k: int = 4, goal_size: int,
                 max_episode_steps: int, **kwargs: Any) -> None:
        if strategy not in HER_STRATEGIES:
            raise ValueError(f"HER strategy must be one of {', '.join(HER_STRATEGIES)}, got {strategy!r}.")
        if k < 1:
            raise ValueError(f"HER needs k >= 1 relabelled goals per transition, got k={k}.")
        if goal_size < 1 or max_episode_steps < 1:
            raise ValueError(f"need goal_size >= 1 and max_episode_steps >= 1, got {goal_size} and {max_episode_steps}.")
        super().__init__(*args, **kwargs)
        ring = self.ring
        if ring.stack != 1 or ring.n_step != 1:
            raise ValueError(f"hindsight replay relabels one-step transitions of unstacked observations; got "
                             f"stack={ring.stack}, n_step={ring.n_step} (set agent.n_step=1).")
        if ring.frame_shape != (2 * goal_size,):
            raise ValueError(f"hindsight replay needs s || g observations of shape ({2 * goal_size},) for "
                             f"goal_size={goal_size}, got frames of shape {ring.frame_shape}.")
        if self.device is not None:
            raise ValueError("hindsight replay keeps its store in NumPy; set replay.on_device=false.")
        self.strategy = strategy
        self.k = int(k)
        self.goal_size = int(goal_size)
        self.max_episode_steps = int(max_episode_steps)
        # Algorithm 1 stores the original transition plus one copy per hindsight goal: k copies for future and
        # episode, one for final.
        copies = 1 if strategy == "final" else self.k
        self.relabel_probability = copies / (copies + 1)
        self._lookahead = np.arange(1, self.max_episode_steps + 1, dtype=np.int64)

    def episode_extent(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(done, back, ahead) for transition slots: ``done`` where the slot's episode has ended and everything
        the strategy may pick from is still stored; ``back`` = t, the slot's step in its episode (its first frame
        is ``back`` slots earlier); ``ahead`` = T - t, the distance to the episode's final-frame slot."""
        ring = self.ring
        age, _ = ring.logical_age(slots)
        stored = ring.count[slots // ring.slots_per_env][:, None]
        later = ring.offset_slots(slots[:, None], self._lookahead)
        final_frame = (age[:, None] + self._lookahead < stored) & ~ring.is_transition[later]
        done = final_frame.any(axis=1)
        ahead = final_frame.argmax(axis=1) + 1
        back = ring.ep_step[slots].astype(np.int64)
        if self.strategy == "episode":
            done &= back <= age  # the episode's first frames must not have been overwritten yet
        return done, back, ahead

    def sample(self, batch_size: int) -> Batch:
        """``batch_size`` transitions of finished episodes drawn uniformly, each relabelled with probability
        k / (k + 1) (1/2 for ``final``) with a goal picked by the strategy, its reward recomputed for that goal."""
        slots, back, ahead = self._finished_slots(batch_size)
        rng, g = self.rng, self.goal_size
        relabel = rng.random(batch_size) < self.relabel_probability
        uniform = rng.random(batch_size)  # drawn whatever the strategy, so the stream advances the same way
        if self.strategy == "final":
            offset = ahead
        elif self.strategy == "future":
            offset = 1 + np.minimum((uniform * ahead).astype(np.int64), ahead - 1)
        else:
            span = back + ahead + 1
            offset = -back + np.minimum((uniform * span).astype(np.int64), span - 1)
        goal = self.ring.gather(self.ring.offset_slots(slots, offset))[:, :g]  # m(s) = s: the state entries

        batch = self._batch(slots, None)
        rows = np.flatnonzero(relabel)
        batch.obs_tm1[rows, 0, g:] = goal[rows]
        batch.obs_t[rows, 0, g:] = goal[rows]
        reached = (batch.obs_t[rows, 0, :g] == goal[rows]).all(axis=1)
        batch.reward_t[rows] = np.where(reached, 0.0, -1.0)  # r(s, a, g) = -[m(s') != g]
        return batch

    def _finished_slots(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Uniform draws over the samplable slots, keeping those whose episode has ended (rejection, so the
        result is uniform over transitions of finished episodes)."""
        parts: list[tuple[np.ndarray, ...]] = []
        need = batch_size
        for _ in range(1000):
            slots = self._uniform_slots(need)
            done, back, ahead = self.episode_extent(slots)
            parts.append((slots[done], back[done], ahead[done]))
            need -= int(done.sum())
            if need <= 0:
                break
        else:
            raise ValueError("hindsight replay samples only transitions of finished episodes and found none: start "
                             "learning after at least one episode per environment has ended "
                             "(train.replay_start_steps >= env.num_envs x the episode length).")
        return tuple(np.concatenate(arrays)[:batch_size] for arrays in zip(*parts))  # type: ignore[return-value]

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "her_strategy": self.strategy, "her_k": self.k, "goal_size": self.goal_size,
                "max_episode_steps": self.max_episode_steps}
