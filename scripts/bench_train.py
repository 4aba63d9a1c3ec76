"""Training speed on real Atari with learning on: agent steps/s of (a) one faithful run, (b) the env alone
(its upper bound), (c) K faithful runs in one process (aggregate agent steps/s of all K; its upper bound is K
envs alone, stepped together), and a plain single-file style DQN loop at the same settings, all measured in
this run.

    python scripts/bench_train.py [--game Breakout] [--steps 800] [--capacity 100000] [--device auto] [--k 4]
        [--warm 1000] [--rounds 3] [--compile | --cuda-graph] [--cleanrl DIR --cleanrl-python PYTHON]

The plain loop is written here the way the well-known single-file implementations are (gymnasium's Python
wrappers, a replay of full obs and next-obs stacks, one batch-1 forward per step, the update in the same
thread); it is our own code, not a copy. Both loops use the Nature settings: a batch of 32 every 4 agent
steps, epsilon-greedy acting, a target network, the replay capacity given. Ends with one JSON line, also
written to results/benchmarks/bench_train.json.

With --cleanrl, each round also times CleanRL's own dqn_atari.py (the common single-file PyTorch DQN, run
from a checkout of https://github.com/vwxyzjn/cleanrl in its own Python environment) at the same settings:
its learning-phase agent steps/s come from the arrival times of the "SPS:" lines it prints every 100 steps.
The issue's CPU target is stated against that implementation; the plain loop above is our stand-in for it.
CleanRL pins gymnasium 0.29 and ale-py 0.8; ale-py 0.9 also works with it and ships the ROMs, e.g.
    python3 -m venv cr && cr/bin/pip install torch gymnasium==0.29.1 ale-py==0.9.0 tyro tensorboard opencv-python
    python scripts/bench_train.py --cleanrl path/to/cleanrl --cleanrl-python cr/bin/python

The update's floating-point work is counted (torch's FLOP counter) and set against the rate of torch's own
dense matrix product on this machine, timed after each timed update (see matmul_timer for what that rate is).

(c) trains seeds 1..K of the same config together (dqn_atari.agent_group): one batched network evaluation
for acting and one batched update per training step, each run still one batch of 32 every 4 of its steps.
"""

from __future__ import annotations

import argparse
import os
from collections import deque
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dqn_atari.agent import resolve_device, update_loss  # noqa: E402
from dqn_atari.agent_group import AgentGroup  # noqa: E402
from dqn_atari.envs import display_name, make_env, resolve_game  # noqa: E402
from dqn_atari.train import Trainer, env_backend_for, train_together  # noqa: E402
from benchlib import finish, machine_info, warmed_runs  # noqa: E402


def env_alone(game: str, steps: int, k: int = 1) -> float:
    """Agent steps/s (all envs together) of k one-env Atari envs with random actions, stepped as the training
    loop steps its runs' envs: start every env's step, then wait for each."""
    envs = [make_env(game, num_envs=1, seed=seed, backend=env_backend_for(k)) for seed in range(k)]
    for env in envs:
        env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, envs[0].num_actions, size=(steps, k, 1))
    t0 = time.perf_counter()
    for a in actions:
        for env, a_env in zip(envs, a):
            env.step_async(a_env)
        for env in envs:
            env.step_wait()
    rate = k * steps / (time.perf_counter() - t0)
    for env in envs:
        env.close()
    return rate


def ours(game: str, steps: int, capacity: int, device: str, tmp: Path, k: int = 1, warm: int = 1000,
         speed: tuple[str, ...] = ()) -> dict:
    """Agent steps/s of seeds 1..k trained together (k = 1: one run), all runs counted, learning on."""
    # Random play, then learning on for `warm` steps; then the timed part, resumed from that checkpoint.
    warmed, trainers = warmed_runs(game, tmp / f"k{k}", device, capacity, warm, steps, k, speed)
    train_together(trainers, interrupt_at_step=2 * warm + steps)
    # The loop's own clock (counters.wall_time, restored on resume) leaves out the resume itself and the
    # checkpoint written at the stop, which would otherwise weigh on a short timed part.
    elapsed = trainers[0].counters.wall_time - warmed[0].counters.wall_time
    done = trainers[0].counters.agent_step - warmed[0].counters.agent_step
    if done < steps:  # a signal (a time limit's SIGTERM, say) stopped the runs, which checkpointed and returned
        raise SystemExit(f"The timed part was stopped after {done:,} of {steps:,} agent steps (a signal?); no figures "
                         f"for it. Give the benchmark more time.")
    # Latencies of the two pieces (for k runs: one batched call for all of them), on the trained agents.
    group = AgentGroup([t.agent for t in trainers])
    obs = [t.obs for t in trainers]
    act = []
    for _ in range(200):
        t0 = time.perf_counter()
        group.act(obs, [0.0] * k)
        act.append(time.perf_counter() - t0)
    # Each update is followed by a dense matrix product of the same machine, so that the two rates compare at
    # the same moments (this machine's speed drifts).
    upd, matmul = [], []
    product = matmul_timer(trainers[0].agent.device)
    for _ in range(30):
        batches = [t.replay.sample(32) for t in trainers]
        t0 = time.perf_counter()
        out = group.update(batches)
        float(out[-1][0]["loss"])  # waits for the device
        upd.append(time.perf_counter() - t0)
        matmul.append(product())
    return {"steps_per_s": k * steps / elapsed, "act_ms": 1e3 * float(np.median(act)),
            "update_ms": 1e3 * float(np.median(upd)), "matmul_gflop_per_s": float(np.median(matmul)),
            **({"update_gflop": update_gflop(trainers[0])} if k == 1 else {})}


def update_gflop(trainer: Trainer) -> float:
    """Floating-point work of one update of ``trainer``'s agent (its loss, with the target network's forward
    pass, and the backward pass), counted by torch's FLOP counter on one replay batch: convolutions and matrix
    products, which are nearly all of it. The weights are left as they were."""
    from torch.utils.flop_counter import FlopCounterMode

    agent = trainer.agent
    batch = agent._to_device(trainer.replay.sample(trainer.cfg.train.batch_size))
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = update_loss(agent.online, agent.target, batch, **agent.loss_args)  # eager, whatever compile says
        loss.backward()
    agent.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def matmul_timer(device: torch.device):
    """A function that times dense float32 matrix products on ``device`` and returns their rate in GFLOP/s: on
    CPU one 1024 x 1024 ``torch.mm`` on the threads torch uses, i.e. torch's BLAS (MKL). On an AMD processor MKL
    runs AVX2 code, while oneDNN (the convolutions, and our large linear layers: dqn_atari.cpu_linear) runs
    AVX-512 code, so there the update's rate can exceed this one. On a GPU, 5 products of 4096 x 4096 between synchronisations (a small one
    would time its launch); there cuDNN may run the convolutions in TF32, which this product does not use
    (torch's default), so the update's rate is not bounded by it."""
    n, repeats = (4096, 5) if device.type == "cuda" else (1024, 1)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # the first product sets up the library's work space

    def product() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return repeats * 2 * n**3 / (time.perf_counter() - t0) / 1e9

    return product


def plain_loop(game: str, steps: int, capacity: int, device: str, warm: int = 1000) -> float:
    """A single-file style DQN loop at the same settings (see the module docstring)."""
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation
    from torch import nn

    gym.register_envs(ale_py)
    env = gym.make(f"ALE/{display_name(resolve_game(game))}-v5", frameskip=1, repeat_action_probability=0.0)
    env = FrameStackObservation(AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84), 4)
    n_actions = env.action_space.n
    dev = resolve_device(device)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(4, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
                             nn.Linear(512, n_actions)).to(dev)

    q, target = net(), net()
    target.load_state_dict(q.state_dict())
    opt = torch.optim.RMSprop(q.parameters(), lr=0.00025, alpha=0.95, eps=0.01, centered=True)
    obs_buf = np.zeros((capacity, 4, 84, 84), np.uint8)
    next_buf = np.zeros((capacity, 4, 84, 84), np.uint8)
    act_buf = np.zeros(capacity, np.int64)
    rew_buf = np.zeros(capacity, np.float32)
    done_buf = np.zeros(capacity, np.float32)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    t0 = None
    for step in range(2 * warm + steps):
        if step == 2 * warm:
            t0 = time.perf_counter()
        if rng.random() < 0.1:
            action = int(rng.integers(n_actions))
        else:
            with torch.no_grad():
                x = torch.as_tensor(np.asarray(obs)[None], device=dev).float() / 255.0
                action = int(q(x).argmax(1).item())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        i = step % capacity
        obs_buf[i], next_buf[i], act_buf[i] = obs, next_obs, action
        rew_buf[i], done_buf[i] = np.sign(reward), float(terminated)
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
        if step >= warm and step % 4 == 0:
            idx = rng.integers(0, min(step + 1, capacity), size=32)
            s = torch.as_tensor(obs_buf[idx], device=dev).float() / 255.0
            s2 = torch.as_tensor(next_buf[idx], device=dev).float() / 255.0
            with torch.no_grad():
                y = torch.as_tensor(rew_buf[idx], device=dev) + 0.99 * (1 - torch.as_tensor(done_buf[idx], device=dev)) * target(s2).max(1).values
            qa = q(s).gather(1, torch.as_tensor(act_buf[idx], device=dev)[:, None]).squeeze(1)
            loss = nn.functional.smooth_l1_loss(qa, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if step % 10_000 == 0:
            target.load_state_dict(q.state_dict())
    env.close()
    return steps / (time.perf_counter() - t0)


def cleanrl(root: Path, python: str, game: str, steps: int, capacity: int, device: str, warm: int) -> float:
    """Agent steps/s of CleanRL's dqn_atari.py between its steps 2*warm and 2*warm + steps (learning starts at
    `warm`), from the arrival times of its "SPS:" lines (printed at every multiple of 100 past learning start)."""
    script = root / "cleanrl" / "dqn_atari.py"
    if not script.exists():
        raise SystemExit(f"--cleanrl {root}: no cleanrl/dqn_atari.py there; give the root of a CleanRL checkout.")
    if warm % 100 or steps % 100:
        raise SystemExit("--cleanrl needs --warm and --steps in multiples of 100 (CleanRL prints every 100 steps).")
    # --end-e 0.1: epsilon 0.1 in the timed steps, as in our loops (Nature's final epsilon; CleanRL's default, 0.01,
    # would skip the network on fewer steps). Its decay, over the first 10 % of its steps, is over by then.
    argv = ["--env-id", f"{display_name(resolve_game(game))}NoFrameskip-v4", "--total-timesteps", str(2 * warm + steps + 100),
            "--learning-starts", str(warm), "--buffer-size", str(capacity), "--end-e", "0.1"]
    if resolve_device(device).type == "cpu":
        argv.append("--no-cuda")
    # ale-py >= 0.9 registers its gymnasium envs on import; CleanRL's script does not import it itself.
    runner = (f"import sys, runpy, ale_py; sys.argv = ['dqn_atari.py'] + {argv!r}; "
              f"runpy.run_path({str(script)!r}, run_name='__main__')")
    # stderr into stdout: a separate pipe that nobody reads while CleanRL runs could fill up and stall it.
    proc = subprocess.Popen([python, "-u", "-c", runner], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(root)})
    stamps, tail = [], deque(maxlen=40)
    for line in proc.stdout:
        if line.startswith("SPS:"):
            stamps.append(time.perf_counter())
        tail.append(line)
    if proc.wait() != 0 or len(stamps) < (2 * warm + steps) // 100 - warm // 100:
        raise SystemExit(f"CleanRL's dqn_atari.py failed (exit {proc.returncode}, {len(stamps)} SPS lines):\n"
                         + "".join(tail))
    first = warm // 100 - 1  # its print at step 2 * warm: the k-th print (from 0) is at step warm + 100 (k + 1)
    last = first + steps // 100
    return steps / (stamps[last] - stamps[first])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--steps", type=int, default=800, help="timed agent steps with learning on")
    parser.add_argument("--capacity", type=int, default=100_000, help="replay capacity of both loops")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--k", type=int, default=4, help="runs trained together in (c)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of (a) and the plain loop; the median round's ratio is reported")
    parser.add_argument("--warm", type=int, default=1000,
                        help="agent steps of random play, then as many with learning on, before the timed steps")
    parser.add_argument("--compile", action="store_true", help="(a) and (c) with compile=true (torch.compile)")
    parser.add_argument("--cuda-graph", action="store_true", help="(a) and (c) with cuda_graph=true (CUDA graphs)")
    parser.add_argument("--cleanrl", type=Path, help="a CleanRL checkout: also time its dqn_atari.py each round")
    parser.add_argument("--cleanrl-python", default=sys.executable,
                        help="the Python of CleanRL's environment (default: this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "bench_train.json",
                        help="where the JSON goes (default: results/benchmarks/bench_train.json)")
    args = parser.parse_args()
    speed = (f"compile={args.compile}", f"cuda_graph={args.cuda_graph}")

    with tempfile.TemporaryDirectory() as tmp:
        env_rate = env_alone(args.game, max(2000, args.steps))
        print(f"env alone (1 env, random actions):     {env_rate:8.1f} agent steps/s", flush=True)
        # One run and the plain loop alternate, so that a change in the machine's speed (it may be shared) falls
        # on both: each round gives a ratio, and the median round is reported.
        rounds, cleanrl_rounds = [], []
        for r in range(args.rounds):
            stats = ours(args.game, args.steps, args.capacity, args.device, Path(tmp) / f"round{r}", 1, args.warm,
                         speed)
            print(f"one faithful run (learning on):        {stats['steps_per_s']:8.1f} agent steps/s "
                  f"(act {stats['act_ms']:.2f} ms, update {stats['update_ms']:.1f} ms)", flush=True)
            plain = plain_loop(args.game, args.steps, args.capacity, args.device, args.warm)
            print(f"plain single-file style loop:          {plain:8.1f} agent steps/s "
                  f"(round {r + 1}/{args.rounds}: ratio {stats['steps_per_s'] / plain:.2f})", flush=True)
            rounds.append((stats["steps_per_s"] / plain, stats, plain))
            if args.cleanrl:
                cr = cleanrl(args.cleanrl, args.cleanrl_python, args.game, args.steps, args.capacity, args.device,
                             args.warm)
                cleanrl_rounds.append((stats["steps_per_s"] / cr, cr))
                print(f"CleanRL dqn_atari.py:                  {cr:8.1f} agent steps/s "
                      f"(round {r + 1}/{args.rounds}: ratio {stats['steps_per_s'] / cr:.2f})", flush=True)
        ratio_to_plain, ours_stats, plain = sorted(rounds, key=lambda x: x[0])[len(rounds) // 2]
        matmul = ours_stats["matmul_gflop_per_s"]
        update_rate = ours_stats["update_gflop"] / ours_stats["update_ms"] * 1e3
        print(f"update: {ours_stats['update_gflop']:.2f} GFLOP in {ours_stats['update_ms']:.1f} ms = {update_rate:.0f} "
              f"GFLOP/s; dense matrix product here: {matmul:.0f} GFLOP/s (ratio {update_rate / matmul:.2f})", flush=True)
        env_k = env_alone(args.game, max(2000, args.steps), args.k)
        print(f"{args.k} envs alone, stepped together:      {env_k:8.1f} agent steps/s (all envs)", flush=True)
        k_stats = ours(args.game, args.steps, args.capacity, args.device, Path(tmp), args.k, args.warm, speed)
        k_runs = k_stats["steps_per_s"]
        print(f"{args.k} runs in one process (learning on): {k_runs:8.1f} agent steps/s (all runs) (act "
              f"{k_stats['act_ms']:.2f} ms, update {k_stats['update_ms']:.1f} ms, for all {args.k})", flush=True)
    result = {
        "name": "bench_train", "game": args.game, "device": str(resolve_device(args.device)),
        "compile": args.compile, "cuda_graph": args.cuda_graph, "timed_steps": args.steps, "warm_steps": args.warm, "replay_capacity": args.capacity, "machine": machine_info(),
        "env_alone_steps_per_s": env_rate, "one_run_steps_per_s": ours_stats["steps_per_s"],
        "plain_loop_steps_per_s": plain, "act_ms": ours_stats["act_ms"], "update_ms": ours_stats["update_ms"],
        "update_gflop": ours_stats["update_gflop"], "update_gflop_per_s": update_rate, "matmul_gflop_per_s": matmul,
        "ratio_update_rate_to_matmul": update_rate / matmul,
        "ratio_one_run_to_env_alone": ours_stats["steps_per_s"] / env_rate,
        "ratio_one_run_to_plain_loop": ratio_to_plain,
        "ratio_one_run_to_plain_loop_rounds": [x[0] for x in rounds],
        "one_run_steps_per_s_rounds": [x[1]["steps_per_s"] for x in rounds],
        "plain_loop_steps_per_s_rounds": [x[2] for x in rounds],
        **({"ratio_one_run_to_cleanrl": sorted(cleanrl_rounds)[len(cleanrl_rounds) // 2][0],
            "ratio_one_run_to_cleanrl_rounds": [x[0] for x in cleanrl_rounds],
            "cleanrl_steps_per_s_rounds": [x[1] for x in cleanrl_rounds]} if cleanrl_rounds else {}),
        "k": args.k, "k_envs_alone_steps_per_s": env_k, "k_runs_per_process_steps_per_s": k_runs,
        "k_runs_act_ms": k_stats["act_ms"], "k_runs_update_ms": k_stats["update_ms"],
        "ratio_k_runs_update_ms_to_one_run": k_stats["update_ms"] / ours_stats["update_ms"],
        "ratio_k_runs_to_one_run": k_runs / ours_stats["steps_per_s"],
        "ratio_k_runs_to_env_alone": k_runs / env_rate,
        "ratio_k_runs_to_k_envs_alone": k_runs / env_k,
        "note": "agent steps/s after warm-up with learning on (one batch of 32 every 4 agent steps per run); "
                "each ratio to a baseline is the median of the rounds' ratios (per-round figures in *_rounds); "
                "one_run_steps_per_s, plain_loop_steps_per_s, act_ms and update_ms are of the round with the "
                "median ratio to the plain loop; "
                "k runs: aggregate over the k runs of one process. Ratios are within this one command; "
                "absolute numbers depend on the machine and its load.",
    }
    print(f"ratios: one run / env alone = {result['ratio_one_run_to_env_alone']:.3f}, "
          f"one run / plain loop = {result['ratio_one_run_to_plain_loop']:.2f}, "
          f"{args.k} runs / one run = {result['ratio_k_runs_to_one_run']:.2f}, "
          f"{args.k} runs / env alone = {result['ratio_k_runs_to_env_alone']:.2f}, "
          f"{args.k} runs / {args.k} envs alone = {result['ratio_k_runs_to_k_envs_alone']:.3f}")
    finish(result, args.out)


if __name__ == "__main__":
    main()
