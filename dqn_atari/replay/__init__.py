"""Replay memory: a uint8 frame store with stacks rebuilt at sample time, n-step returns, prioritized sampling.

Why. The Nature DQN replays from the last 1,000,000 transitions (Mnih et al. 2015, Extended Data Table 1,
"replay memory size"). Storing every observation as a 4-frame stack, plus the next one, takes 28-56 GB;
storing each 84x84 frame once takes 7.06 GB. So frames are stored once and stacks are rebuilt when sampled.

Layout (per-env rings). `capacity` is split evenly into `num_envs` rings of `capacity // num_envs` slots
(the remainder is unused). Env e owns the flat slot ids [e*S, (e+1)*S); each env's stream is written
contiguously into its own ring, so parallel envs never interleave and a stack is rebuilt by looking back
within one ring. A slot holds ONE frame plus its step's data: `add` writes, per env, a transition slot
(newest frame of s_t, a_t, r_{t+1}, `terminated`, `episode_end`) and, if the episode ended, a final-frame
slot holding the newest frame of the last observation. So capacity counts frames, as the paper's replay
does, and an episode of T steps takes T + 1 slots.

Stacks. The observation at slot j is the `stack` frames ending at j. Frames from before the episode's first
frame are zeros (one shared all-zero frame), never frames of the previous episode. A life loss that is
marked `terminated` without `episode_end` does not start a new episode: later stacks still include the
frames before it, exactly like the environment's own observation stack; only the n-step return and the
bootstrap are cut there.

n-step returns (Sutton & Barto 2018, Section 7.1; used by Rainbow, Hessel et al. 2018). From transition t
the window runs over m <= n steps and stops after the first transition that is `terminated` or
`episode_end`: reward_t = sum_{k<m} gamma^k r_{t+k+1}; discount_t = 0 if the window stopped at a terminal
(no bootstrap past a real terminal), else gamma^m; obs_t is the observation m steps later. At a time-limit
truncation (episode_end without terminated) the bootstrap is KEPT: obs_t is the final observation and
discount_t = gamma^m, because the episode was cut by the clock, not by the MDP (partial-episode
bootstrapping, Pardo et al. 2018, "Time Limits in Reinforcement Learning", ICML).

Which slots can be sampled. A transition is valid only while (1) its whole n-step window is stored: n
later transitions of the same episode, or the episode ended within the window; and (2) none of the frames
of its stack (and so of its bootstrap stack) has been overwritten by the write cursor. Final-frame slots,
the newest transitions whose window is still open, and the oldest whose stack reaches past the cursor are
never sampled; `valid_indices()` lists the others. Validity is kept incrementally at each add (only the
few slots around each cursor can change), so uniform sampling is rejection over written slots and the
prioritized tree holds priority 0 for invalid slots.

Devices. `device=None` keeps everything in NumPy and returns NumPy arrays (contiguous, ready for
`torch.from_numpy`). `device="cuda"` (or `"cpu"`) keeps the frames in a torch tensor on that device and
returns torch tensors there; indices are drawn and computed identically on the host, so the same seed gives
the same samples from both stores.

Memory check. The store is allocated and touched up front. Before allocating, the bytes needed are compared
with `MemAvailable` in /proc/meminfo (and with free GPU memory for a cuda store); if they do not fit, a
`ReplayMemoryError` (a MemoryError) says how much is needed and available and suggests a smaller
`replay.capacity`.

Hindsight relabelling (Andrychowicz et al. 2017). `HindsightReplayBuffer` is uniform replay over the same ring
whose sampled transitions of goal-conditioned observations (s || g) get hindsight goals (`final`, `future`,
`episode`) and recomputed rewards; see `dqn_atari.replay.hindsight`.

Save/load. `save(directory)` and `load(directory)` are atomic, incremental and checksummed; see
`dqn_atari.replay.storage`.
"""

from __future__ import annotations

from dqn_atari.replay.hindsight import HER_STRATEGIES, HindsightReplayBuffer
from dqn_atari.replay.prioritized import PrioritizedReplayBuffer
from dqn_atari.replay.ring import FrameRing, ReplayMemoryError, available_memory_bytes
from dqn_atari.replay.storage import ReplayCorruptError
from dqn_atari.replay.sum_tree import SumTree
from dqn_atari.replay.uniform import Batch, ReplayBuffer

__all__ = [
    "Batch",
    "FrameRing",
    "HER_STRATEGIES",
    "HindsightReplayBuffer",
    "PrioritizedReplayBuffer",
    "ReplayBuffer",
    "ReplayCorruptError",
    "ReplayMemoryError",
    "SumTree",
    "available_memory_bytes",
]
