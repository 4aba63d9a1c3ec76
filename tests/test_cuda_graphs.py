"""CUDA graphs (config ``cuda_graph=true``, dqn_atari.cuda_graphs): the wrapper's own bookkeeping on any machine
(warm-up calls, capture, fresh inputs copied in, outputs that the next call does not overwrite), the config's
errors, and on a GPU the real graphs against plain updates."""

import copy

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten

from dqn_atari.agent import Agent
from dqn_atari.agent_group import AgentGroup
from dqn_atari.config import ConfigError, load_config
from dqn_atari.cuda_graphs import MAX_GRAPHS, WARMUP, Graphed
from dqn_atari.train import groups_as_now
from test_agent import B  # the replay batch's fields

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batch(rng: np.random.Generator, obs_shape: tuple, n: int = 32, num_actions: int = 2) -> B:
    obs = lambda: rng.integers(0, 256, (n, *obs_shape)).astype(np.uint8 if len(obs_shape) == 3 else np.float32)
    return B(obs(), rng.integers(0, num_actions, n), rng.normal(size=n).astype(np.float32),
             np.full(n, 0.99, np.float32), obs(), np.arange(n), np.ones(n, np.float32))


def rerun_capture(fn, inputs):
    """cuda_capture's contract without a GPU, for the wrapper's bookkeeping: recording runs nothing, and each
    replay runs ``fn`` on the static inputs and returns the same output tensors, overwritten in place."""
    outputs = None

    def replay():
        nonlocal outputs
        fresh = fn(*inputs)
        if outputs is None:
            outputs = fresh
        else:
            for old, new in zip(tree_flatten(outputs)[0], tree_flatten(fresh)[0]):
                old.copy_(new)
        return outputs

    return replay


def assert_same_greedy(plain: Agent, plain_actions: np.ndarray, graphed_actions: np.ndarray, obs: np.ndarray) -> int:
    """Equal greedy actions wherever the plain network's best action leads the next by more than float noise
    (the graphed Adam's last bits differ, which may flip a near tie). Returns how many were compared, for the
    caller to check that the comparisons were not all skipped as ties."""
    with torch.no_grad():
        q = plain.online(plain._frames(torch.as_tensor(obs, device=plain.device))).q
    top = q.topk(2, dim=1).values
    clear = ((top[:, 0] - top[:, 1]) > 1e-4).cpu().numpy()
    assert (plain_actions == graphed_actions)[clear].all()
    return int(clear.sum())


def test_graph_wrapper_feeds_each_call_its_batch_and_returns_its_own_outputs():
    """The wrapper's bookkeeping on CPU (rerun_capture stands in for a CUDA graph; the GPU tests below compare
    real graphs): each call's batch is copied into the static inputs, and each call's outputs are copies, so
    the updates and losses are the plain agent's."""
    cfg = load_config(None, ["torso=mlp", "mlp_hidden=[16]", "hidden=16", "lr=0.01"])
    plain, graphed_agent = [Agent(cfg, (1, 3), num_actions=2) for _ in range(2)]
    graphed_agent.online.load_state_dict(plain.online.state_dict())
    graphed_agent.target.load_state_dict(plain.target.state_dict())
    graphed = Graphed(graphed_agent._step, capture=rerun_capture)
    rng = np.random.default_rng(0)
    plain_losses, graphed_stats = [], []
    for _ in range(WARMUP + 5):  # warm-up calls, the capture, then replays
        b = batch(rng, (1, 3))
        plain_losses.append(float(plain.update(b)[0]["loss"]))
        graphed_stats.append(graphed(graphed_agent._to_device(b))[0])
    assert len(graphed.graphs) == 1
    # Each call's own loss: outputs are copies, not the static tensors the next replay overwrites.
    assert [float(s["loss"]) for s in graphed_stats] == plain_losses
    assert len(set(plain_losses)) == len(plain_losses)
    for p, q in zip(plain.online.parameters(), graphed_agent.online.parameters()):
        assert torch.equal(p, q)


def test_graphs_are_kept_per_input_shape_up_to_a_limit():
    calls = []

    def fn(x):
        calls.append(x.shape)
        return {"y": 2 * x + 1}

    graphed = Graphed(fn, capture=rerun_capture)
    for i in range(3 * (WARMUP + 2)):
        for n in range(1, MAX_GRAPHS + 3):
            x = torch.full((n,), float(i))
            assert torch.equal(graphed(x)["y"], 2 * x + 1)
    assert len(graphed.graphs) == MAX_GRAPHS
    graphed.reset()
    assert not graphed.graphs and not graphed.calls


def test_a_failed_capture_warns_once_and_the_calls_run_without_a_graph():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    def failing_capture(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed = Graphed(fn, capture=failing_capture)
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="capture of .*fn failed.*not permitted") as caught:
        outputs = [graphed(x + i) for i in range(WARMUP + 3)]
    assert len(caught) == 1 and not graphed.graphs
    assert len(calls) == WARMUP + 3  # every call did its work, the failed capture's included
    for i, out in enumerate(outputs):
        assert torch.equal(out, (x + i) * 2)


@pytest.mark.parametrize("overrides, fragment", [
    (["cuda_graph=true", "compile=true"], "cuda_graph=true and compile=true do not go together"),
    (["cuda_graph=true", "noisy=true"], "does not support noisy nets or IQN"),
    (["cuda_graph=true", "head=iqn"], "does not support noisy nets or IQN"),
])
def test_cuda_graph_config_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_cuda_graph_on_cpu_is_a_clear_error():
    cfg = load_config(None, ["torso=mlp", "cuda_graph=true"])
    with pytest.raises(ValueError, match="cuda_graph=true needs a CUDA device"):
        Agent(cfg, (1, 3), num_actions=2, device="cpu")


@needs_cuda
@pytest.mark.parametrize("overrides", [
    ["optimizer=rmsprop_nature"], ["optimizer=adam", "max_grad_norm=10"], ["double=true", "dueling=true"],
    ["head=c51"], ["head=qr", "target_tau=0.5"],
], ids=["nature", "adam-clip", "double-dueling", "c51", "qr-soft-target"])
def test_cuda_graph_updates_and_actions_match_plain_ones_on_gpu(overrides):
    base = ["device=cuda", "replay.prioritized=true", *overrides]
    plain = Agent(load_config(None, base), (4, 84, 84), num_actions=4, device="cuda")
    graphed = Agent(load_config(None, base + ["cuda_graph=true"]), (4, 84, 84), num_actions=4, device="cuda")
    graphed.online.load_state_dict(plain.online.state_dict())
    graphed.target.load_state_dict(plain.target.state_dict())
    rng = np.random.default_rng(0)
    compared = 0
    for i in range(WARMUP + 8):
        b = batch(rng, (4, 84, 84), num_actions=4)
        (s1, p1), (s2, p2) = plain.update(b), graphed.update(b)
        torch.testing.assert_close(s2["loss"], s1["loss"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-5)
        obs = b.obs_t[:1]
        compared += assert_same_greedy(plain, plain.greedy(obs), graphed.greedy(obs), obs)
        if i % 2:  # the graphs read the target network's tensors, which a sync overwrites in place
            plain.sync_target()
            graphed.sync_target()
        if i == WARMUP + 3:  # as after a restore: warm up and capture anew
            graphed.reset_graphs()
    assert compared > 0, "every greedy action was a near tie: nothing was compared"
    assert graphed._graphs[0].graphs and graphed._graphs[1].graphs
    for p, q in zip(plain.online.parameters(), graphed.online.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("overrides", [
    [], ["optimizer=adam", "max_grad_norm=10", "head=c51", "replay.prioritized=true"],
], ids=["nature", "adam-clip-c51-prioritized"])
def test_cuda_graph_batched_update_of_two_runs_matches_plain_one_on_gpu(overrides):
    def group(graph: bool) -> AgentGroup:
        torch.manual_seed(0)
        agents = [Agent(load_config(None, ["device=cuda", f"seed={s}", f"cuda_graph={graph}", *overrides]),
                        (4, 84, 84), num_actions=4, device="cuda") for s in (1, 2)]
        return AgentGroup(agents)

    plain, graphed = group(False), group(True)
    assert plain.batched and graphed.batched
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(WARMUP + 4):
        batches = [batch(rng, (4, 84, 84), num_actions=4) for _ in range(2)]
        for (s1, _), (s2, _) in zip(plain.update(batches), graphed.update(batches)):
            torch.testing.assert_close(s2["loss"], s1["loss"], rtol=1e-4, atol=1e-5)
        obs = [b.obs_t[:1] for b in batches]
        for agent, o, a1, a2 in zip(plain.agents, obs, plain.greedy(obs, [True, True]),
                                    graphed.greedy(obs, [True, True])):
            compared += assert_same_greedy(agent, a1, a2, o)
        for a in plain.agents + graphed.agents:
            a.sync_target()
    assert compared > 0, "every greedy action was a near tie: nothing was compared"
    assert graphed._graphs[0].graphs and graphed._graphs[1].graphs
    for a, b in zip(plain.agents, graphed.agents):
        for p, q in zip(a.online.parameters(), b.online.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_adam_checkpointed_with_cuda_graphs_resumes_on_cpu():
    """cuda_graph=true makes Adam capturable, a flag its saved parameter groups carry; a CPU resume must not
    inherit it (Adam refuses to step CPU parameters with it)."""
    p = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    saved.step()
    state = copy.deepcopy(saved.state_dict())  # a checkpoint: not the tensors the next step changes
    groups = [{**g, "capturable": True} for g in state["param_groups"]]  # as a run with cuda_graph=true saves them
    q = torch.nn.Parameter(p.detach().clone())
    resumed = torch.optim.Adam([q])
    resumed.load_state_dict({"state": state["state"], "param_groups": groups_as_now(resumed, groups)})
    assert resumed.param_groups[0]["capturable"] is False
    for opt, param in ((saved, p), (resumed, q)):
        param.grad = torch.full((3,), 0.5)
        opt.step()
    assert torch.equal(q, p)  # the resumed optimizer's second step is the saved one's
