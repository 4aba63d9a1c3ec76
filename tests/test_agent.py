"""The DQN update on a hand-made batch against numbers computed here: Huber loss, target, RMSProp step."""

import copy
from typing import NamedTuple

import numpy as np
import pytest
import torch

from dqn_atari.agent import Agent, NatureRMSprop, greedy_actions
from dqn_atari.config import load_config


class B(NamedTuple):
    obs_tm1: np.ndarray
    action_tm1: np.ndarray
    reward_t: np.ndarray
    discount_t: np.ndarray
    obs_t: np.ndarray
    indices: np.ndarray
    weights: np.ndarray


def test_nature_rmsprop_matches_deepmind_formula_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = NatureRMSprop([w], lr=0.1, decay=0.9, eps=0.01)
    g, g2, w_ref = np.zeros(2), np.zeros(2), np.array([1.0, -2.0])
    for grad in ([0.5, -1.0], [0.3, 2.0], [-0.2, 0.1]):
        w.grad = torch.tensor(grad)
        opt.step()
        grad = np.array(grad)
        g = 0.9 * g + 0.1 * grad
        g2 = 0.9 * g2 + 0.1 * grad**2
        w_ref = w_ref - 0.1 * grad / np.sqrt(g2 - g**2 + 0.01)
    np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=1e-6)
    # First step, by hand: g = 0.05, g2 = 0.025, denominator sqrt(0.025 - 0.0025 + 0.01) = sqrt(0.0325).
    w2 = torch.nn.Parameter(torch.tensor([0.0]))
    opt2 = NatureRMSprop([w2], lr=0.1, decay=0.9, eps=0.01)
    w2.grad = torch.tensor([0.5])
    opt2.step()
    assert w2.item() == pytest.approx(-0.1 * 0.5 / np.sqrt(0.0325), rel=1e-6)
    # PyTorch's centered RMSprop puts eps outside the root and so differs: the reason this class exists.
    w3 = torch.nn.Parameter(torch.tensor([0.0]))
    torch_opt = torch.optim.RMSprop([w3], lr=0.1, alpha=0.9, eps=0.01, centered=True)
    w3.grad = torch.tensor([0.5])
    torch_opt.step()
    assert abs(w3.item() - w2.item()) > 1e-3


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("double", [False, True])
def test_dqn_update_matches_hand_computation(double, compile):
    torch.manual_seed(0)
    cfg = load_config(None, ["torso=mlp", "mlp_hidden=[8]", "hidden=8", f"double={str(double).lower()}",
                             "lr=0.01", "discount=0.9", f"compile={compile}"])
    agent = Agent(cfg, (1, 3), num_actions=2)
    # Make the target network differ from the online one so the target rule matters.
    with torch.no_grad():
        for p in agent.target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    online0, target = copy.deepcopy(agent.online), agent.target
    rng = np.random.default_rng(1)
    batch = B(obs_tm1=rng.normal(size=(4, 1, 3)).astype(np.float32), action_tm1=np.array([0, 1, 1, 0]),
              reward_t=np.array([1.0, 0.0, -1.0, 0.5], np.float32), discount_t=np.array([0.9, 0.9, 0.0, 0.81], np.float32),
              obs_t=rng.normal(size=(4, 1, 3)).astype(np.float32), indices=np.arange(4), weights=np.ones(4, np.float32))

    # By hand: y = r + discount * Q_target(s', a*), a* = argmax of target (DQN) or online (Double DQN).
    with torch.no_grad():
        q_next_t = target(torch.as_tensor(batch.obs_t)).q.numpy()
        q_next_o = online0(torch.as_tensor(batch.obs_t)).q.numpy()
    a_star = (q_next_o if double else q_next_t).argmax(1)
    y = batch.reward_t + batch.discount_t * q_next_t[np.arange(4), a_star]
    q = online0(torch.as_tensor(batch.obs_tm1)).q
    q_sa = q[torch.arange(4), torch.as_tensor(batch.action_tm1)]
    delta = torch.as_tensor(y) - q_sa
    huber = torch.where(delta.abs() <= 1, 0.5 * delta**2, delta.abs() - 0.5)  # Nature: error clipped to [-1, 1]
    huber.sum().backward()  # DeepMind's code: gradient of the sum over the batch
    expected = {}
    for name, p in online0.named_parameters():
        grad = p.grad.numpy()
        g, g2 = 0.05 * grad, 0.05 * grad**2  # first RMSProp step from zero state, decay 0.95
        expected[name] = p.detach().numpy() - 0.01 * grad / np.sqrt(g2 - g**2 + 0.01)

    stats, priority = agent.update(batch)
    assert float(stats["loss"]) == pytest.approx(float(huber.sum().detach()), rel=1e-5)
    np.testing.assert_allclose(priority.numpy(), delta.abs().detach().numpy(), rtol=1e-5)
    for name, p in agent.online.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), expected[name], rtol=1e-4, atol=1e-6)


def test_epsilon_greedy_rates_and_greedy_choice():
    cfg = load_config(None, ["torso=mlp", "mlp_hidden=[8]"])
    agent = Agent(cfg, (1, 3), num_actions=4)
    obs = np.zeros((20_000, 1, 3), np.float32)
    greedy = agent.greedy(obs[:1])[0]
    actions = agent.act(obs, epsilon=0.2)
    # Non-greedy actions appear with probability 0.2 * 3/4 = 0.15 (binomial sd ~0.0025).
    assert abs((actions != greedy).mean() - 0.15) < 0.015
    assert (agent.act(obs[:100], epsilon=0.0) == greedy).all()


@pytest.mark.parametrize("variant", ["nature_dqn", "iqn"])
def test_compiled_update_follows_the_eager_one(variant):
    """compile=true (torch.compile of the loss, its backward and the optimizer step) is the same update: on
    the same batches, from the same weights, losses and weights agree to float rounding, and IQN's quantile
    fractions, drawn inside the compiled graph, come from torch's generator exactly as in eager mode."""
    agents, rng_states = [], []
    for compile in (False, True):
        cfg = load_config(f"configs/{variant}.yaml", ["device=cpu", f"compile={compile}"])
        torch.manual_seed(0)
        agents.append(Agent(cfg, (4, 84, 84), num_actions=4))
    rng = np.random.default_rng(0)
    batches = [B(obs_tm1=rng.integers(0, 256, (32, 4, 84, 84), dtype=np.uint8), action_tm1=rng.integers(0, 4, 32),
                 reward_t=rng.choice([-1.0, 0.0, 1.0], 32).astype(np.float32),
                 discount_t=rng.choice([0.0, 0.99], 32).astype(np.float32),
                 obs_t=rng.integers(0, 256, (32, 4, 84, 84), dtype=np.uint8), indices=np.arange(32),
                 weights=np.ones(32, np.float32)) for _ in range(3)]
    losses = []
    for agent in agents:
        torch.manual_seed(1)
        losses.append([float(agent.update(b)[0]["loss"]) for b in batches])
        rng_states.append(torch.get_rng_state())
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    for p_eager, p_compiled in zip(agents[0].online.parameters(), agents[1].online.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-6)
    assert torch.equal(rng_states[0], rng_states[1])
    assert any(not torch.equal(p, q) for p, q in zip(agents[0].online.parameters(), agents[0].target.parameters()))


@pytest.mark.parametrize("variant", ["nature_dqn", "iqn"])
def test_compiled_acting_follows_the_eager_one(variant):
    """compile=true also compiles the greedy action: the same actions as the eager network for one env and for a
    batch, and IQN's quantile fractions drawn from torch's generator as in eager mode."""
    cfg = load_config(f"configs/{variant}.yaml", ["device=cpu", "compile=true"])
    torch.manual_seed(0)
    agent = Agent(cfg, (4, 84, 84), num_actions=6)
    assert agent._greedy_actions is not greedy_actions
    rng = np.random.default_rng(0)
    for n in (1, 5, 5):
        obs = rng.integers(0, 256, (n, 4, 84, 84), dtype=np.uint8)
        torch.manual_seed(n)
        compiled = agent.greedy(obs)
        compiled_rng = torch.get_rng_state()
        torch.manual_seed(n)
        with torch.no_grad():
            eager = greedy_actions(agent.online, agent._frames(torch.as_tensor(obs))).numpy()
        np.testing.assert_array_equal(compiled, eager)
        assert torch.equal(compiled_rng, torch.get_rng_state())


def test_compile_without_a_cxx_compiler_is_a_clear_error(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found: tried g++, clang++")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    cfg = load_config(None, ["torso=mlp", "mlp_hidden=[8]", "compile=true"])
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler .* or set compile=false"):
        Agent(cfg, (1, 3), num_actions=2)
    Agent(load_config(None, ["torso=mlp", "mlp_hidden=[8]"]), (1, 3), num_actions=2)  # compile=false: no compiler needed
