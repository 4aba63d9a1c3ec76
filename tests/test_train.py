"""The training loop end to end: learning on CartPole, bit-identical resume, config safety, smoke runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dqn_atari.cli import build_config, main
from dqn_atari.config import ConfigError
from dqn_atari.rundir import RunDir
from dqn_atari.train import Trainer, epsilon_at, train
from same_run import assert_same_run

ROOT = Path(__file__).resolve().parent.parent
NATURE = ROOT / "configs" / "nature_dqn.yaml"
CARTPOLE = ROOT / "configs" / "control" / "cartpole.yaml"


def cartpole_config(tmp_path, *overrides):
    from dqn_atari.config import deep_merge, read_yaml, config_from_dict, apply_overrides

    data = deep_merge(read_yaml(NATURE), read_yaml(CARTPOLE))
    data = apply_overrides(data, [f"runs_root={tmp_path}", "device=cpu", *overrides])
    return config_from_dict(data)


def atari_config(tmp_path, *overrides):
    return build_config(NATURE, [f"runs_root={tmp_path}", "device=cpu", "env.game=Breakout", "train.frames=3200",
                                 "replay.capacity=2000", "train.replay_start_steps=200", "target_update_steps=250",
                                 "epsilon_decay_steps=500", "eval.period_steps=400", "eval.episodes=1",
                                 "eval.max_steps=400", "eval.num_envs=1", "eval.max_episode_frames=1200", "checkpoint_period_steps=300", *overrides])


def test_epsilon_schedule_counts_agent_steps_from_replay_start():
    cfg = build_config(NATURE, [])
    assert epsilon_at(0, cfg) == 1.0 and epsilon_at(50_000, cfg) == 1.0
    assert epsilon_at(50_000 + 500_000, cfg) == pytest.approx(0.55)
    assert epsilon_at(1_050_000, cfg) == pytest.approx(0.1) and epsilon_at(5_000_000, cfg) == pytest.approx(0.1)


def test_replay_ratio_and_target_period_are_kept_with_several_envs(tmp_path):
    """8 replayed transitions per agent step, whatever the number of environments."""
    counts = {}
    for n in (1, 4):
        cfg = cartpole_config(tmp_path / f"n{n}", f"env.num_envs={n}", "train.frames=2000", "update_period_steps=4",
                              "batch_size=32", "replay_start_steps=400", "target_update_steps=300",
                              "eval.period_steps=100000")
        trainer = Trainer(cfg, progress=False)
        trainer.train()
        counts[n] = (trainer.counters.updates, trainer.counters.target_syncs)
    assert counts[1] == counts[4] == ((2000 - 400) // 4, 2000 // 300)


# DQN learning CartPole (configs/control/cartpole.yaml, seed 1) is tests/test_variants.py::
# test_variant_learns_cartpole[nature_dqn], with every other variant beside it.


@pytest.mark.parametrize("kind", ["cartpole", "atari"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, kind):
    make = cartpole_config if kind == "cartpole" else atari_config
    extra = ("train.frames=3000", "checkpoint_period_steps=700", "eval.period_steps=1000") if kind == "cartpole" else ()
    whole = make(tmp_path / "whole", *extra)
    train(whole, progress=False)
    parts = make(tmp_path / "parts", *extra)
    # Interrupt twice, at steps that are not checkpoint or evaluation boundaries, then finish.
    for stop in (450, 610):
        run = Trainer(parts, progress=False).train(interrupt_at_step=stop)
        assert not run.is_done
    run = train(parts, progress=False)
    assert run.is_done
    assert_same_run(Trainer(whole, progress=False).run.path, run.path)


def test_a_run_saved_on_cpu_resumes_where_torch_has_another_rng_stream(tmp_path, monkeypatch):
    """On CUDA the trainer keeps a second torch RNG stream that a checkpoint written on CPU lacks: the resume
    goes on (that stream starts fresh), rather than taking the checkpoint for a damaged one."""
    import torch
    from safetensors.torch import load_file

    from dqn_atari import train as train_module

    # Noisy nets draw from torch's stream at every update, so the saved stream is not the fresh one.
    cfg = cartpole_config(tmp_path, "train.frames=1500", "network.noisy=true", "train.replay_start_steps=100")
    Trainer(cfg, progress=False).train(interrupt_at_step=300)
    cpu_state = train_module._torch_rng_state
    monkeypatch.setattr(train_module, "_torch_rng_state", lambda device: {**cpu_state(device), "cuda": torch.zeros(8)})
    trainer = Trainer(cfg, progress=False)
    fresh = trainer.torch_rng["torch"].clone()
    assert trainer.setup() and trainer.counters.agent_step == 300
    assert torch.equal(trainer.torch_rng["cuda"], torch.zeros(8))
    saved = load_file(str(trainer.last_checkpoint / "tensors.safetensors"))["rng.torch"]
    assert torch.equal(trainer.torch_rng["torch"], saved) and not torch.equal(saved, fresh)  # restored, not fresh
    trainer.close()


def test_one_process_at_a_time_trains_a_run(tmp_path, capsys):
    """A second trainer of a run that is being trained (e.g. the same `make reproduce` started twice) stops with
    a clear error before touching anything; once the first is done with it, the run is free again."""
    from dqn_atari.train import RunBusy

    cfg = cartpole_config(tmp_path, "train.frames=1500")
    first = Trainer(cfg, progress=False)
    assert first.setup()
    with pytest.raises(RunBusy, match="being trained by another process"):
        Trainer(cfg, progress=False).train()
    huge = cartpole_config(tmp_path, "train.frames=1500", "replay.capacity=1e12")
    with pytest.raises(RunBusy):  # said before its env and replay are built (this replay would not fit in memory)
        Trainer(huge, progress=False)
    assert main(["train", str(CARTPOLE), f"runs_root={tmp_path}", "device=cpu", "train.frames=1500",
                 "--no-progress"]) == RunBusy.exit_status == 75
    assert "being trained by another process" in capsys.readouterr().err
    first.close()
    assert Trainer(cfg, progress=False).train().is_done


def test_a_stop_signal_cuts_an_evaluation_short_and_the_resume_plays_it_again(tmp_path, monkeypatch):
    """A real SIGTERM as the second periodic evaluation starts, and again as the resume replays it: each time the
    run stops within a step instead of finishing the evaluation (checkpointed at that evaluation's step, nothing
    of it written), and the run finally equals one never stopped."""
    import os
    import signal

    from dqn_atari import checkpoint as ckpt
    from dqn_atari import train as train_module

    extra = ("train.frames=3000", "checkpoint_period_steps=700", "eval.period_steps=1000")
    whole = cartpole_config(tmp_path / "whole", *extra)
    train(whole, progress=False)
    parts = cartpole_config(tmp_path / "parts", *extra)
    real, stops = train_module.make_eval_env, {1: 2}  # evaluation index -> signals still to send at its start

    def make_eval_env(cfg, index):
        if stops.get(index):
            stops[index] -= 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg, index)

    monkeypatch.setattr(train_module, "make_eval_env", make_eval_env)
    for _ in range(2):
        run = train(parts, progress=False)
        assert not run.is_done and run.eval["agent_step"].tolist() == [1000]
        assert ckpt.step_of(ckpt.generations(run.path / "checkpoints")[0]) == 2000
    assert stops[1] == 0
    run = train(parts, progress=False)
    assert run.is_done
    assert_same_run(Trainer(whole, progress=False).run.path, run.path)


def test_resuming_with_a_different_config_is_refused(tmp_path):
    cfg = cartpole_config(tmp_path, "train.frames=1500")
    run_dir = Trainer(cfg, progress=False).train(interrupt_at_step=300).path
    changed = cartpole_config(tmp_path, "train.frames=1500", "agent.lr=0.01")
    with pytest.raises(ConfigError, match="agent.lr"):
        Trainer(changed, progress=False).train()
    # Another optimizer cannot take the saved one's state: refused before anything is written.
    other = cartpole_config(tmp_path, "train.frames=1500", "agent.optimizer=rmsprop_nature", "force=true")
    with pytest.raises(ConfigError, match="another optimizer .*recorded 'adam', now 'rmsprop_nature'"):
        Trainer(other, progress=False).train()
    assert RunDir(run_dir).config["agent"]["optimizer"] == "adam" and not RunDir(run_dir).config_changes
    forced = cartpole_config(tmp_path, "train.frames=1500", "agent.lr=0.01", "force=true")
    trainer = Trainer(forced, progress=False)
    run = trainer.train()
    assert run.is_done and run.config["agent"]["lr"] == 0.01
    assert trainer.agent.optimizer.param_groups[0]["lr"] == 0.01  # the new value is the one used, not the saved
    assert run.protocol["eval_max_episode_frames"] == 500  # CartPole's own time limit, which its env applies
    # config.yaml now holds the new config; what the first 300 steps ran with is kept, and the report says it.
    assert run.config_changes == [{"agent_step": 300, "changes": ["agent.lr: recorded 0.001, now 0.01"]}]
    from dqn_atari.analysis.report import write_game_report

    md, _png = write_game_report("nature_dqn", "CartPole", tmp_path, out_dir=tmp_path / "reports")
    assert "seed 1, from agent step 300: agent.lr: recorded 0.001, now 0.01" in md.read_text()
    # A finished run is not passed off as another config's (e.g. a longer budget): a clear error, not "DONE".
    longer = cartpole_config(tmp_path, "train.frames=3000", "agent.lr=0.01")
    with pytest.raises(ConfigError, match="finished run of a different config.*train.frames: recorded 1500, now 3000"):
        Trainer(longer, progress=False).train()
    assert Trainer(cartpole_config(tmp_path, "train.frames=1500", "agent.lr=0.01"), progress=False).train().is_done


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path, monkeypatch):
    """`make smoke` for one game: training, evaluation, checkpoints, final weights and the report."""
    monkeypatch.chdir(ROOT)
    rc = main(["reproduce", "--smoke", "--game", "Pong", "--variant", "nature_dqn", "--seeds", "1", "--no-progress",
               f"runs_root={tmp_path / 'runs'}", "train.frames=12000", "device=cpu"])
    assert rc == 0
    run_dir = tmp_path / "runs" / "nature_dqn" / "Pong" / "seed1"
    for name in ("config.yaml", "train.csv", "eval.csv", "protocol.json", "DONE", "model.safetensors"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "tb").iterdir())
    assert not (run_dir / "checkpoints").exists()
    report = tmp_path / "reports" / "nature_dqn" / "Pong.md"
    assert report.exists() and "Pong" in report.read_text()
    assert (tmp_path / "reports" / "nature_dqn" / "Pong.png").stat().st_size > 1000
    # Re-evaluating the run, with a colour video of it playing.
    video = tmp_path / "pong.mp4"
    assert main(["evaluate", str(run_dir), "episodes=1", f"video={video}"]) == 0
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(video))
    frame = reader.get_data(50)
    assert reader.count_frames() > 100 and frame.shape == (210, 160, 3)
    assert (frame[..., 0] != frame[..., 2]).any()  # colour, not grayscale
    reader.close()
    # Re-running the finished run does nothing.
    assert main(["reproduce", "--smoke", "--game", "Pong", "--seeds", "1", "--no-progress",
                 f"runs_root={tmp_path / 'runs'}", "train.frames=12000", "device=cpu"]) == 0


@pytest.mark.slow
def test_reproduce_parallel_trains_every_seed_in_one_process_and_reports_them(tmp_path, monkeypatch):
    """`make reproduce ... PARALLEL=1`: the seeds train together, each as alone (bit for bit on CPU, where Nature
    CNN runs take turns), and the report covers all of them."""
    monkeypatch.chdir(ROOT)
    common = ["--smoke", "--game", "Pong", "--variant", "nature_dqn", "--no-progress"]
    budget = ["train.frames=4000", "replay_start_steps=300", "eval.period_steps=500", "checkpoint_period_steps=500",
              "device=cpu"]
    assert main(["reproduce", *common, "--seeds", "1 2", "--parallel", "--",
                 f"runs_root={tmp_path / 'together' / 'runs'}", *budget]) == 0
    assert main(["reproduce", *common, "--seeds", "2", "--", f"runs_root={tmp_path / 'alone' / 'runs'}", *budget]) == 0
    together = tmp_path / "together" / "runs" / "nature_dqn" / "Pong"
    for seed in (1, 2):
        assert (together / f"seed{seed}" / "DONE").exists()
    assert_same_run(tmp_path / "alone" / "runs" / "nature_dqn" / "Pong" / "seed2", together / "seed2")
    report = (tmp_path / "together" / "reports" / "nature_dqn" / "Pong.md").read_text()
    assert "seeds: 2 (1, 2)" in report


@pytest.mark.parametrize("argv, fragment", [
    (["train", "configs/nature_dqn.yaml", "env.game=Breakoutt"], "Breakout"),
    (["train", "configs/nature_dqn.yaml", "agent.lrr=1"], "agent.lr"),
    (["train", "configs/nope.yaml"], "does not exist"),
    (["reproduce", "--variant", "natur_dqn"], "nature_dqn"),
    (["reproduce", "--seeds", "1 x"], "ranges like 1-5; got 'x'"),
    (["train", "configs"], "is a directory"),
    (["train", "configs/nature_dqn.yaml", "env.game=CartPole"], "train configs/control/cartpole.yaml"),
])
def test_cli_bad_input_is_a_clear_error(argv, fragment, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    rc = main(argv + [f"runs_root={tmp_path}"])
    assert rc == 2
    assert fragment in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_warm_up_longer_than_the_budget_is_a_warning(tmp_path, capsys):
    Trainer(cartpole_config(tmp_path, "train.frames=500", "replay_start_steps=500"), progress=False).close()
    assert "train.replay_start_steps (500) is not below the budget of 500 agent steps" in capsys.readouterr().err
    Trainer(cartpole_config(tmp_path, "train.frames=500", "replay_start_steps=499"), progress=False).close()
    assert "warning" not in capsys.readouterr().err


def test_progress_bars_redraw_once_a_minute_into_a_log_file(monkeypatch):
    """A bar on a terminal redraws as tqdm likes; written to a file (nohup, a batch job's log) once a minute:
    over 6 updates 0.15 s apart, the file gets only the first and the last drawing."""
    import io
    import time

    from dqn_atari.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    redraws = {}
    for stream in (io.StringIO(), Terminal()):
        monkeypatch.setattr("sys.stderr", stream)
        bar = progress_bar(total=10)
        for _ in range(6):
            time.sleep(0.15)
            bar.update(1)
        bar.close()
        assert "6/10" in stream.getvalue()
        redraws[type(stream).__name__] = stream.getvalue().count("\r")
    assert redraws["StringIO"] == 2 and redraws["Terminal"] >= 6, redraws


def test_importance_beta_anneals_from_beta0_to_one_over_the_whole_run(tmp_path):
    """Schaul et al. 2016, Sec. 3.4: beta reaches 1 at the end of learning, whatever the run's length."""
    trainer = Trainer(cartpole_config(tmp_path, "replay.prioritized=true", "replay.beta0=0.4", "train.frames=4000"),
                      progress=False)
    betas = []
    for step in (0, trainer.total_steps // 2, trainer.total_steps, 2 * trainer.total_steps):
        trainer.counters.agent_step = step
        betas.append(trainer.importance_beta())
    assert betas == pytest.approx([0.4, 0.7, 1.0, 1.0])
