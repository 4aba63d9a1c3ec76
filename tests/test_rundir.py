"""RunDir: the files the trainer writes and the analysis reads, round-tripped through real files."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from dqn_atari import rundir as rundir_mod
from dqn_atari.rundir import EVAL_COLUMNS, TRAIN_COLUMNS, RunDir, RunDirError, find_runs

CONFIG = {
    "variant": "nature_dqn",
    "seed": 3,
    "env": {"game": "Breakout", "protocol": "nature2015", "noop_max": 30, "frame_skip": (4, 4)},
    "train": {"frames": 10_000_000, "lr": 0.00025},
    "eval": {"epsilon": 0.05, "max_episode_frames": 18_000, "episodes": 30},
    "extra": {"opaque": [1, 2, {"x": None}], "flag": True},
}
PROTOCOL = {"name": "nature2015", "description": "Nature 2015 evaluation", "start": "noop", "noop_max": 30,
            "sticky_p": 0.0, "eval_epsilon": 0.05, "max_episode_frames": 18_000}


def train_row(step: int, score: float = 1.0) -> dict:
    return {"agent_step": step, "frames": 4 * step, "episode": step // 100, "score": score, "length": 100,
            "epsilon": 0.5, "wall_time": 1.25}


def eval_row(step: int, scores) -> dict:
    return {"agent_step": step, "frames": 4 * step, "scores": scores, "wall_time": 2.5}


def test_layout_and_round_trip(tmp_path):
    run = RunDir.for_run(tmp_path, "nature_dqn", "Breakout", 3)
    assert run.path == tmp_path / "nature_dqn" / "Breakout" / "seed3"
    assert not run.exists and not run.is_done
    run.write_config(CONFIG)
    run.write_protocol(PROTOCOL)
    run.append_train([train_row(100, 2.0), train_row(200, -1.0)])
    run.append_train([train_row(300, 7.0)])
    scores = [0.1, 3.0, 1e6 + 0.5, -21.0]  # a Video Pinball sized score must survive without rounding
    run.append_eval(eval_row(250, scores))
    run.append_eval(eval_row(500, np.array([5.0])))
    assert run.exists and not run.is_done

    config = run.config
    assert config["env"]["frame_skip"] == [4, 4]  # tuples come back as lists
    assert config["extra"] == CONFIG["extra"] and config["train"] == CONFIG["train"]
    assert run.protocol == PROTOCOL

    train = run.train
    assert list(train.columns) == list(TRAIN_COLUMNS)
    assert train["agent_step"].tolist() == [100, 200, 300]
    assert train["score"].tolist() == [2.0, -1.0, 7.0]
    assert (run.path / "train.csv").read_text().count("agent_step") == 1  # header written once

    ev = run.eval
    assert list(ev.columns) == list(EVAL_COLUMNS)
    np.testing.assert_array_equal(ev["scores"].iloc[0], scores)
    assert ev["mean_score"].iloc[0] == pytest.approx(np.mean(scores))
    assert ev["median_score"].iloc[0] == pytest.approx(np.median(scores))
    assert ev["std_score"].iloc[0] == pytest.approx(np.std(scores))
    assert ev["num_episodes"].tolist() == [4, 1]

    run.mark_done({"final_score": 5.0})
    assert run.is_done and run.done_summary == {"final_score": 5.0}
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_empty_done_marker_and_missing_files(tmp_path):
    run = RunDir(tmp_path / "v" / "g" / "seed0")
    assert run.train.empty and list(run.train.columns) == list(TRAIN_COLUMNS)
    assert run.eval.empty and run.protocol == {}
    with pytest.raises(RunDirError, match="config.yaml is missing"):
        _ = run.config
    run.mark_done()
    assert run.is_done and run.done_summary == {}


def test_bad_input_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="seed"):
        RunDir.for_run(tmp_path, "v", "g", -1)
    with pytest.raises(ValueError, match="plain directory name"):
        RunDir.for_run(tmp_path, "a/b", "g", 1)
    with pytest.raises(ValueError, match="name"):
        run.write_protocol({"start": "noop"})
    with pytest.raises(ValueError, match=r"config\.env\.thing"):
        run.write_config({"env": {"thing": object()}})
    with pytest.raises(ValueError, match="scores"):
        run.append_eval({"agent_step": 1, "frames": 4, "wall_time": 0.0})
    with pytest.raises(ValueError, match="num_episodes"):
        run.append_eval({**eval_row(1, [1.0, 2.0]), "num_episodes": 3})
    run.append_train([train_row(1)])
    with pytest.raises(ValueError, match=r"missing \['wall_time'\]"):
        run.append_train([{k: v for k, v in train_row(2).items() if k != "wall_time"}])
    with pytest.raises(ValueError, match=r"unexpected \['loss'\]"):
        run.append_train([{**train_row(2), "loss": 0.1}])



def test_unreadable_config_and_protocol_name_the_file(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir(parents=True)
    for name, attr, garbage, wrong_kind in (("config.yaml", "config", "a: [1", "- 1\n- 2\n"),
                                            ("protocol.json", "protocol", "{", "[1, 2]")):
        (run.path / name).write_text(garbage)
        with pytest.raises(RunDirError, match=rf"{name} is not valid (YAML|JSON)"):
            getattr(run, attr)
        (run.path / name).write_text(wrong_kind)
        with pytest.raises(RunDirError, match=rf"{name} should hold a (mapping|JSON object), found list"):
            getattr(run, attr)

def test_evaluation_without_finished_episodes(tmp_path):
    run = RunDir(tmp_path / "run")
    run.append_eval(eval_row(10, []))  # the evaluation's step budget ran out before any episode ended
    run.append_eval(eval_row(20, [3.0]))
    ev = run.eval
    assert ev["num_episodes"].tolist() == [0, 1] and ev["scores"].iloc[0].size == 0
    assert np.isnan(ev["mean_score"].iloc[0]) and ev["mean_score"].iloc[1] == 3.0


def test_extra_columns_fixed_at_creation(tmp_path):
    run = RunDir(tmp_path / "run")
    run.append_train([{**train_row(1), "loss": 0.5}])
    run.append_train([{**train_row(2), "loss": 0.25}])
    assert run.train["loss"].tolist() == [0.5, 0.25]


def test_truncate_after_drops_later_rows_atomically(tmp_path):
    run = RunDir(tmp_path / "run")
    run.append_train([train_row(s) for s in (100, 200, 300, 400)])
    for s in (150, 300, 450):
        run.append_eval(eval_row(s, [float(s)]))
    run.truncate_after(300)
    assert run.train["agent_step"].tolist() == [100, 200, 300]
    assert run.eval["agent_step"].tolist() == [150, 300]
    run.truncate_after(300)  # idempotent
    assert run.train["agent_step"].tolist() == [100, 200, 300]
    run.append_train([train_row(400)])  # resumed training goes on without duplicates
    assert run.train["agent_step"].tolist() == [100, 200, 300, 400]
    run.truncate_after(0)
    assert run.train.empty and run.eval.empty
    run.append_eval(eval_row(10, [1.0]))  # header still there after truncating every row
    assert run.eval["agent_step"].tolist() == [10]


@pytest.mark.parametrize("line, reading, resuming", [
    ("300,1200\n", "line 4 has 2 fields", None),  # a short row is not read as a row of NaNs
    ("abc,1200,3,5.0,100,0.5,1.25\n", "is corrupt", "could not convert string to float: 'abc'"),
])
def test_a_damaged_row_is_an_error_naming_the_file_and_resuming_changes_nothing(tmp_path, line, reading, resuming):
    run = RunDir(tmp_path / "run")
    run.append_train([train_row(100), train_row(200)])
    with open(run.path / "train.csv", "a") as f:
        f.write(line)
    before = (run.path / "train.csv").read_bytes()
    with pytest.raises(RunDirError, match=reading):
        run.train
    if resuming:
        with pytest.raises(RunDirError, match=f"train.csv is damaged .*{resuming}.*nothing was changed"):
            run.truncate_after(150)
    assert (run.path / "train.csv").read_bytes() == before


def test_partial_last_line_from_a_crash_is_ignored_then_repaired(tmp_path):
    run = RunDir(tmp_path / "run")
    run.append_train([train_row(100), train_row(200)])
    with open(run.path / "train.csv", "a") as f:  # the process died in the middle of writing a row
        f.write("300,1200,3,5.")
    assert run.train["agent_step"].tolist() == [100, 200]
    run.append_train([train_row(300)])
    assert run.train["agent_step"].tolist() == [100, 200, 300]
    with open(run.path / "eval.csv", "w") as f:  # died while writing the header itself
        f.write("agent_step,fra")
    assert run.eval.empty
    run.append_eval(eval_row(300, [2.0]))
    assert run.eval["agent_step"].tolist() == [300]
    with open(run.path / "train.csv", "a") as f:
        f.write("400,1600")
    run.truncate_after(10_000)
    assert (run.path / "train.csv").read_text().endswith("\n")
    assert run.train["agent_step"].tolist() == [100, 200, 300]


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.write_config(CONFIG)

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(rundir_mod.os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        run.write_config({**CONFIG, "seed": 99})
    monkeypatch.undo()
    assert run.config["seed"] == 3
    assert sorted(os.listdir(run.path)) == ["config.yaml"]


def test_a_report_whose_rewrite_fails_halfway_keeps_the_old_one(tmp_path):
    """Reports, tables and figures are rewritten through replace_atomically: a full disk halfway through a
    rewrite leaves the previous file whole, and no temporary file behind."""
    import errno

    import matplotlib.pyplot as plt

    fig = plt.figure()
    png = tmp_path / "reports" / "Pong.png"
    rundir_mod.atomic_savefig(png, fig, dpi=50)
    old = png.read_bytes()
    assert old.startswith(b"\x89PNG")

    def half_then_full(tmp):
        tmp.write_bytes(old[: len(old) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        rundir_mod.replace_atomically(png, half_then_full)
    plt.close(fig)
    assert png.read_bytes() == old and os.listdir(png.parent) == ["Pong.png"]


def test_config_changes_after_the_step_a_run_resumes_from_are_forgotten(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.config_changes == []
    run.record_config_change(300, ["agent.lr: recorded 0.001, now 0.01"])
    run.record_config_change(600, ["agent.lr: recorded 0.01, now 0.02"])
    run.forget_config_changes_after(450)  # resumed from a checkpoint before the second change
    assert run.config_changes == [{"agent_step": 300, "changes": ["agent.lr: recorded 0.001, now 0.01"]}]
    run.forget_config_changes_after(-1)  # started over from step 0
    assert run.config_changes == [] and not (run.path / RunDir.CONFIG_CHANGES).exists()


def test_find_runs_skips_and_names_unreadable_dirs(tmp_path):
    good = RunDir.for_run(tmp_path, "nature_dqn", "Pong", 1)
    good.write_config(CONFIG)
    good.append_eval(eval_row(10, [1.0]))
    running = RunDir.for_run(tmp_path, "nature_dqn", "Pong", 2)  # not done: still listed (analysis decides)
    running.write_config(CONFIG)
    no_config = RunDir.for_run(tmp_path, "nature_dqn", "Pong", 3)
    no_config.append_train([train_row(1)])
    bad_csv = RunDir.for_run(tmp_path, "nature_dqn", "Pong", 4)
    bad_csv.write_config(CONFIG)
    (bad_csv.path / "eval.csv").write_text(",".join(EVAL_COLUMNS) + "\n1,4,oops,1,0,1,1.0,0.1\n")
    bad_count = RunDir.for_run(tmp_path, "nature_dqn", "Pong", 5)
    bad_count.write_config(CONFIG)
    bad_count.append_eval(eval_row(10, [1.0, 2.0]))
    text = (bad_count.path / "eval.csv").read_text().replace(",2,1.0 2.0,", ",3,1.0 2.0,")
    (bad_count.path / "eval.csv").write_text(text)
    bad_yaml = RunDir.for_run(tmp_path, "nature_dqn", "Pong", 6)
    bad_yaml.path.mkdir(parents=True)
    (bad_yaml.path / "config.yaml").write_text("variant: [unclosed\n")
    (tmp_path / "nature_dqn" / "Pong" / "notes").mkdir()  # not a seed dir: ignored silently

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = find_runs(tmp_path)
    assert runs == [good, running]
    messages = "\n".join(str(w.message) for w in caught)
    for bad in (no_config, bad_csv, bad_count, bad_yaml):
        assert str(bad.path) in messages
    assert len(caught) == 4
