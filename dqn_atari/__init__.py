"""dqn_atari: faithful, fast reproductions of Nature DQN and its descendants on the Atari 2600."""

__version__ = "0.1.0"
