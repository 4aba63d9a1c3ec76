import re
from pathlib import Path

import pytest

from dqn_atari.config import (
    Config, ConfigError, describe_fields, find_variant_config, frames_to_steps, load_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_nature_config_holds_the_paper_numbers():
    cfg = load_config(CONFIGS / "nature_dqn.yaml")
    assert cfg.agent.lr == 0.00025 and cfg.agent.discount == 0.99
    assert cfg.agent.rms_decay == 0.95 and cfg.agent.rms_eps == 0.01
    assert cfg.agent.target_update_steps == 10_000
    assert cfg.replay.capacity == 1_000_000
    assert cfg.train.batch_size == 32 and cfg.train.update_period_steps == 4
    assert cfg.train.replay_start_steps == 50_000 and cfg.train.epsilon_decay_steps == 1_000_000
    assert (cfg.train.epsilon_start, cfg.train.epsilon_end) == (1.0, 0.1)
    assert cfg.eval.epsilon == 0.05 and cfg.eval.max_episode_frames == 18_000
    # The evaluation cap follows the protocol unless set: Machado et al. / Dopamine evaluate 108,000-frame episodes.
    machado = load_config(CONFIGS / "nature_dqn.yaml", ["env.protocol=machado2018"])
    assert machado.eval.max_episode_frames == 108_000
    assert load_config(CONFIGS / "nature_dqn.yaml",
                       ["env.protocol=machado2018", "eval.max_episode_frames=18000"]).eval.max_episode_frames == 18_000
    assert frames_to_steps(cfg.train.frames) == 50_000_000  # the paper's "50 million frames" count agent steps


def test_overrides_dotted_and_bare_keys_with_type_conversion():
    cfg = load_config(CONFIGS / "nature_dqn.yaml", ["agent.lr=1e-4", "batch_size=64", "double=true",
                                                    "env.game=Pong", "frames=1e6", "mlp_hidden=[64, 64]"])
    assert cfg.agent.lr == 1e-4 and cfg.train.batch_size == 64 and cfg.agent.double is True
    assert cfg.env.game == "Pong" and cfg.train.frames == 1_000_000 and cfg.network.mlp_hidden == (64, 64)


@pytest.mark.parametrize("override, fragment", [
    ("agent.lrr=0.1", "agent.lr"),
    ("learning_rate=0.1", "Unknown config key"),
    ("batchsize=3", "batch_size"),
])
def test_unknown_keys_name_the_closest_valid_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_a_blank_section_takes_the_defaults_but_a_section_of_another_type_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("agent:\n")
    assert load_config(path).agent == load_config(None).agent
    path.write_text("agent: []\n")
    with pytest.raises(ConfigError, match="agent in .* must be a mapping"):
        load_config(path)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("agent:\n  discont: 0.9\n")
    with pytest.raises(ConfigError, match="agent.discount"):
        load_config(path)


@pytest.mark.parametrize("override, fragment", [
    ("lr=-0.1", "agent.lr must be positive"),
    ("batch_size=0", "train.batch_size must be >= 1"),
    ("discount=1.5", "agent.discount must be in"),
    ("n_step=0", "agent.n_step must be >= 1"),
    ("num_atoms=1", "num_atoms must be at least 2"),
    ("batch_size=abc", "must be an integer"),
    ("batch_size=2.5", "must be an integer"),
    ("double=maybe", "true or false"),
    ("head=foo", "network.head must be"),
    ("device=tpu", "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    ("torch_threads=-1", "torch_threads must be >= 0"),
    ("mlp_hidden=[0]", "network.mlp_hidden must be a non-empty list of positive sizes"),
    ("runs_root=~", "runs_root must be a string, got nothing"),  # YAML null: not the folder "None"
    ("env.game=on", "env.game must be a string, got True (quote it)"),  # YAML 1.1 boolean
    ("agent.rms_eps=.inf", "agent.rms_eps must be a finite number"),  # would silently stop all learning
    ("variant=a/b", "variant names the run's folder"),
    ("seed=1e30", "seed must be in [0, 2**63)"),
    ("seed=-1", "seed must be in [0, 2**63)"),
    ("env.overrides.seed=3", "env.overrides cannot set seed: use the config keys"),
])
def test_bad_values_are_clear_errors(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, [override])

def test_integers_take_the_frames_option_s_forms():
    """train.frames=10M works as --frames 10M does; the same forms fit every integer key."""
    cfg = load_config(CONFIGS / "nature_dqn.yaml", ["train.frames=10M", "replay.capacity=100k", "seed=1e3"])
    assert (cfg.train.frames, cfg.replay.capacity, cfg.seed) == (10_000_000, 100_000, 1000)
    with pytest.raises(ConfigError, match=re.escape("train.frames must be an integer like 1000000, 1e6 or 1M, "
                                                    "got '10 frames'")):
        load_config(None, ["train.frames=10 frames"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(None, ["train.frames=2.5"])


def test_missing_config_file_lists_available_ones(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory; give a YAML config file"):
        load_config(tmp_path)


def test_variant_lookup_suggests_close_names():
    assert find_variant_config("nature_dqn", CONFIGS).name == "nature_dqn.yaml"
    with pytest.raises(ConfigError, match="nature_dqn"):
        find_variant_config("nature_dq", CONFIGS)


def test_every_field_is_documented():
    rows = describe_fields()
    assert len(rows) > 40
    undocumented = [key for key, _default, doc in rows if not doc]
    assert not undocumented, undocumented


def test_config_is_frozen_and_round_trips():
    import dataclasses

    cfg = load_config(CONFIGS / "nature_dqn.yaml", ["seed=3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.agent.lr = 1.0  # type: ignore[misc]
    assert cfg.seed == 3 and cfg.agent.lr == 0.00025
    from dqn_atari.config import config_from_dict

    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(Config().to_dict()["network"]["mlp_hidden"], list)
