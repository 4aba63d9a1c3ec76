"""The variants (issue 5): every paper config builds and updates, every variant learns CartPole through the one
training loop, the Rainbow ablations differ from Rainbow by one switch, and ``base:`` layering works.

Covered elsewhere and not repeated here: hand-computed targets and losses (double-Q, dueling, 3-atom categorical
projection, quantile Huber) in tests/test_losses.py and tests/test_networks.py; n-step returns with terminals
and truncations inside the window against a naive reference in tests/test_replay.py
(test_matches_naive_reference_with_wraparound, n_step=3).
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dqn_atari.agent import Agent
from dqn_atari.config import (
    ConfigError, apply_overrides, config_from_dict, deep_merge, flatten_keys, load_config, read_yaml,
)
from dqn_atari.replay import Batch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
CARTPOLE = CONFIGS / "control" / "cartpole.yaml"
PACKAGE = ROOT / "dqn_atari"

# Files under configs/ that are layers over a variant, not variants themselves.
LAYERS = {CONFIGS / "smoke.yaml"}
LAYER_DIRS = {CONFIGS / "control"}


def variant_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.yaml")
                  if p not in LAYERS and not any(d in p.parents for d in LAYER_DIRS))


PAPER_VARIANTS = ["nature_dqn", "double_dqn", "dueling", "prioritized", "c51", "noisy", "rainbow", "qr_dqn", "iqn"]
ABLATION_SWITCHES = {  # Hessel et al. 2018, Fig. 3: the one field each ablation changes, and to what
    "rainbow_no_double": {"agent.double": False},
    "rainbow_no_prioritized": {"replay.prioritized": False},
    "rainbow_no_dueling": {"network.dueling": False},
    "rainbow_no_multistep": {"agent.n_step": 1},
    "rainbow_no_distributional": {"network.head": "q"},
    "rainbow_no_noisy": {"network.noisy": False, "train.epsilon_end": 0.01, "train.epsilon_decay_steps": 62_500},
}


flat = flatten_keys


# ----------------------------------------------------------------------------------------------------------
# Every config file: loads, names itself, builds an Atari agent, takes one update


def test_the_variant_list_is_complete():
    stems = {p.stem for p in variant_configs()}
    assert set(PAPER_VARIANTS) | set(ABLATION_SWITCHES) == stems


@pytest.mark.parametrize("path", variant_configs(), ids=lambda p: p.stem)
def test_config_builds_an_atari_agent_and_takes_one_update(path):
    cfg = load_config(path, ["device=cpu"])
    assert cfg.variant == path.stem, f"{path} must set variant: {path.stem} (the run directory is named after it)"
    torch.manual_seed(0)
    agent = Agent(cfg, (4, 84, 84), 6)
    rng = np.random.default_rng(0)
    b = 4
    batch = Batch(obs_tm1=rng.integers(0, 256, (b, 4, 84, 84), dtype=np.uint8),
                  action_tm1=rng.integers(0, 6, b).astype(np.int64),
                  reward_t=rng.uniform(-1, 1, b).astype(np.float32),
                  discount_t=np.array([0.99**cfg.agent.n_step, 0.0, 0.99**cfg.agent.n_step, 0.0], np.float32),
                  obs_t=rng.integers(0, 256, (b, 4, 84, 84), dtype=np.uint8),
                  indices=np.arange(b), weights=np.ones(b, np.float32))
    before = [p.detach().clone() for p in agent.online.parameters()]
    stats, priority = agent.update(batch)
    assert np.isfinite(float(stats["loss"]))
    assert tuple(priority.shape) == (b,) and bool(torch.all(priority >= 0))
    changed = sum(not torch.equal(p0, p1) for p0, p1 in zip(before, agent.online.parameters()))
    assert changed > 0, "one update changed no parameter"
    # The switches arrive where they act.
    assert agent.online.head == cfg.network.head
    assert agent.online.dueling == cfg.network.dueling and agent.online.noisy == cfg.network.noisy


# ----------------------------------------------------------------------------------------------------------
# Ablations are Rainbow with one switch off; base: layering


@pytest.mark.parametrize("name, switch", ABLATION_SWITCHES.items())
def test_each_ablation_is_rainbow_with_one_switch_off(name, switch):
    rainbow = flat(load_config(CONFIGS / "rainbow.yaml").to_dict())
    ablation = flat(load_config(CONFIGS / "ablations" / f"{name}.yaml").to_dict())
    differ = {k for k in rainbow if rainbow[k] != ablation[k]} - {"variant"}
    assert differ == set(switch), f"{name} differs from rainbow in {sorted(differ)}"
    assert all(ablation[k] == v for k, v in switch.items())


def test_rainbow_turns_on_the_six_components():
    cfg = load_config(CONFIGS / "rainbow.yaml")
    assert cfg.agent.double and cfg.replay.prioritized and cfg.network.dueling and cfg.network.noisy
    assert cfg.agent.n_step == 3 and cfg.network.head == "c51"
    # Hessel et al. 2018, Table 1, in agent steps: 32K frames, 80K frames.
    assert cfg.agent.target_update_steps == 8_000 and cfg.train.replay_start_steps == 20_000
    assert (cfg.agent.lr, cfg.agent.adam_eps, cfg.replay.alpha, cfg.replay.beta0) == (6.25e-5, 1.5e-4, 0.5, 0.4)


def test_base_layers_resolve_relative_to_the_file_and_merge(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("variant: root\nagent: {lr: 0.1, n_step: 3}\nenv: {overrides: {a: 1}}\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\nvariant: mid\nagent: {n_step: 2}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: ../mid.yaml\nvariant: leaf\nenv: {overrides: {b: 2}}\n")
    data = read_yaml(tmp_path / "sub" / "leaf.yaml")
    # Nested sections merge key by key; env.overrides is replaced whole (deep_merge's rule).
    assert data == {"variant": "leaf", "agent": {"lr": 0.1, "n_step": 2}, "env": {"overrides": {"b": 2}}}


def test_base_cycles_and_missing_bases_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        read_yaml(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        read_yaml(tmp_path / "self.yaml")
    (tmp_path / "c.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError, match="relative to the file"):
        read_yaml(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="base must be the path"):
        read_yaml(tmp_path / "d.yaml")


# ----------------------------------------------------------------------------------------------------------
# One training loop for every variant


def _calls(tree: ast.AST, attr: str, receiver: str) -> list[str]:
    """Qualified names of the functions that call ``<...receiver...>.attr(...)``."""
    found = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == attr
                    and receiver in ast.unparse(child.func.value)):
                found.append(".".join(scope))
            visit(child, scope)

    visit(tree, [])
    return found


def _call_sites(attr: str, receiver: str) -> set[tuple[str, str]]:
    sites = set()
    for path in PACKAGE.rglob("*.py"):
        if (PACKAGE / "envs") in path.parents:  # the environments themselves step their emulators
            continue
        for scope in _calls(ast.parse(path.read_text()), attr, receiver):
            sites.add((path.relative_to(PACKAGE).as_posix(), scope))
    return sites


def test_there_is_one_training_loop():
    """Variants are switches, not copies of the loop: environments are stepped only by the loop and
    by the evaluation paths, and only the loop stores transitions and calls the update."""
    assert _call_sites("step", "env") == {
        ("train.py", "evaluate"),            # periodic / final evaluation
        ("evaluate.py", "record_video"),     # watching a trained agent
    }
    # The training loop (one run, or K runs of one process in lockstep) starts every run's env step, then waits.
    assert _call_sites("step_async", "env") == {("train.py", "_Lockstep.steps")}
    assert _call_sites("step_wait", "env") == {("train.py", "_Lockstep.steps")}
    assert _call_sites("add", "replay") == {("train.py", "Trainer.record_step")}
    # One agent's update (a single run; IQN runs), or K runs' as one vmapped update inside the group.
    assert _call_sites("update", "agent") == {("agent_group.py", "AgentGroup.update")}
    assert _call_sites("update", "group") == {("train.py", "_Lockstep.learn")}
    assert _call_sites("learn", "self") == {("train.py", "_Lockstep.steps")}


def test_the_learning_code_never_branches_on_the_variant_name():
    """A variant's behaviour comes from its switches; `if cfg.variant == "rainbow"` would be a hidden copy."""
    offenders = []
    for path in [*PACKAGE.glob("*.py"), *(PACKAGE / "replay").glob("*.py")]:
        if path.name in ("ablations.py", "cli.py", "sweep.py", "rundir.py", "config.py"):
            continue  # naming runs and files, not learning
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and "variant" in ast.unparse(node):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------------------------------------
# Every variant learns CartPole through the real loop (configs/control/cartpole.yaml layered over its config)

SOLVED = 400.0  # mean greedy return over the periodic evaluation's 10 episodes (CartPole-v1 caps episodes at 500)
CARTPOLE_BUDGET_STEPS = 50_000  # configs/control/cartpole.yaml's train.frames (one frame = one agent step)
EVAL_PERIOD_STEPS = 2_500
CARTPOLE_SEEDS = (1, 2, 3)  # tried in turn until one solves (test_variant_learns_cartpole says why)


def cartpole_config(variant: str, tmp_path: Path, *overrides: str):
    data = deep_merge(read_yaml(CONFIGS / f"{variant}.yaml"), read_yaml(CARTPOLE))
    return config_from_dict(apply_overrides(data, [f"runs_root={tmp_path}", "device=cpu", "seed=1",
                                                   f"train.frames={CARTPOLE_BUDGET_STEPS}",
                                                   f"eval.period_steps={EVAL_PERIOD_STEPS}", *overrides]))


def train_until_solved(cfg) -> tuple[int | None, list[float]]:
    """Train through the real loop one evaluation period at a time (each stop checkpoints, each start resumes,
    which is bit-identical to an uninterrupted run: tests/test_train.py) and stop at the first evaluation
    whose mean reaches SOLVED. Returns (that agent step or None, every evaluation mean)."""
    from dqn_atari.train import Trainer

    stop = 0
    while True:
        stop += cfg.eval.period_steps
        trainer = Trainer(cfg, progress=False)
        run = trainer.train(interrupt_at_step=stop)
        if not run.is_done and trainer.counters.agent_step < stop:
            raise KeyboardInterrupt("the run stopped on a signal")  # the trainer caught Ctrl-C / SIGTERM
        ev = run.eval
        assert (ev["num_episodes"] == cfg.eval.episodes).all(), "an evaluation lost episodes to its step budget"
        solved = ev.loc[ev["mean_score"] >= SOLVED, "agent_step"]
        if len(solved) or run.is_done:
            return (int(solved.iloc[0]) if len(solved) else None), ev["mean_score"].round(1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_variant_learns_cartpole(variant, tmp_path, record_property):
    """Solved by seed 1, or else by seed 2 or 3: one seed's run is a single draw, and the draw moves with the
    processor (float32 sums differ between CPU kernels: nature_dqn's seed 1 solved at its last evaluation on an
    Intel Xeon and not at all on an AMD EPYC, where seeds 2 and 3 solved at 40,000 and 30,000 steps). A variant
    that does not learn solves with none of them. The table of steps to solve is printed at the end of the
    session (tests/conftest.py)."""
    cfg = cartpole_config(variant, tmp_path)
    # The layer keeps the variant's switches (it only sizes the task): what is tested is the variant.
    paper = load_config(CONFIGS / f"{variant}.yaml")
    for field in ("network.head", "network.dueling", "network.noisy", "agent.double", "agent.n_step",
                  "replay.prioritized"):
        section, name = field.split(".")
        assert getattr(getattr(cfg, section), name) == getattr(getattr(paper, section), name), field
    start, start_cpu = time.perf_counter(), time.process_time()
    tries = []
    for seed in CARTPOLE_SEEDS:
        step, evals = train_until_solved(cartpole_config(variant, tmp_path / f"seed{seed}", f"seed={seed}"))
        tries.append(f"seed {seed}: {evals}")
        if step is not None:
            break
    solved = f"{step:,} (seed {seed})" if step else "not solved"
    record_property("summary", ("CartPole steps to solve (first periodic evaluation, 10 greedy episodes, with mean "
                                f"return >= {SOLVED:.0f}; budget {CARTPOLE_BUDGET_STEPS:,} steps, seed 1, else 2, "
                                f"else 3):\n"
                                f"  {'variant':<14}{'solved at':>20}{'wall':>8}{'CPU':>8}  evaluations",
                                f"{variant:<14}{solved:>20}{time.perf_counter() - start:>6.0f} s"
                                f"{time.process_time() - start_cpu:>6.0f} s  {'; '.join(tries)}"))
    assert step is not None, (f"{variant} never reached a mean greedy return of {SOLVED} on CartPole with seeds "
                              f"{CARTPOLE_SEEDS}: {tries}")


# ----------------------------------------------------------------------------------------------------------
# make ablations: Rainbow and its six ablations through the reproduce path, then the figure and the table


def test_ablations_driver_trains_every_ablation_then_draws_the_figure_and_table(tmp_path, capsys):
    from dqn_atari.ablations import VARIANTS, ablations_main

    tiny_cartpole = [f"runs_root={tmp_path / 'runs'}", "device=cpu", "torch_threads=1", "torso=mlp", "mlp_hidden=[32,32]",
                     "capacity=2000", "replay_start_steps=100", "batch_size=16", "target_update_steps=100",
                     "epsilon_decay_steps=200", "eval.period_steps=200", "eval.episodes=2", "eval.num_envs=2",
                     "checkpoint_period_steps=1000"]
    argv = ["--game", "CartPole", "--seeds", "1", "--frames", "400", "--no-progress", *tiny_cartpole]
    assert ablations_main(argv) == 0
    for variant in VARIANTS:
        assert (tmp_path / "runs" / variant / "CartPole" / "seed1" / "DONE").exists(), variant
    md = tmp_path / "reports" / "ablations" / "CartPole.md"
    png = tmp_path / "reports" / "ablations" / "CartPole.png"
    assert png.stat().st_size > 1000
    rows = [line for line in md.read_text().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(VARIANTS)
    assert "no multi-step" in md.read_text() and "final - Rainbow" in md.read_text()
    # Re-running finds every run DONE: nothing is trained again, the report is redrawn.
    capsys.readouterr()
    assert ablations_main(argv) == 0
    assert capsys.readouterr().out.count("is DONE; nothing to do") == len(VARIANTS)
    # Another budget does not pass the finished runs off as its own (they would be drawn as 800-frame runs).
    assert ablations_main([*argv, "--frames", "800"]) == 2
    assert "finished run of a different config" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["--seeds", "one"], "Seeds are"),
    (["--frames", "lots"], "--frames"),
    (["agent.lrr=1"], "agent.lr"),
])
def test_ablations_bad_input_is_a_clear_error(argv, fragment, tmp_path, capsys):
    from dqn_atari.ablations import ablations_main

    assert ablations_main([*argv, f"runs_root={tmp_path}"]) == 2
    assert fragment in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
