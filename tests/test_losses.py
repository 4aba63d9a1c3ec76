"""Targets and losses on numbers worked out by hand, plus a short real optimisation per head."""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import pytest
import torch

from dqn_atari.losses import (LossOut, categorical_projection, huber, q_learning_targets, quantile_huber_loss,
                              td_loss)
from dqn_atari.networks import NoisyLinear, build_network

OBS = (1, 4)


class Batch(NamedTuple):
    obs_tm1: torch.Tensor
    action_tm1: torch.Tensor
    reward_t: torch.Tensor
    discount_t: torch.Tensor
    obs_t: torch.Tensor


def batch_of(actions: list[int], rewards: list[float], discounts: list[float], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    n = len(actions)
    return Batch(torch.randn(n, *OBS, generator=g), torch.tensor(actions), torch.tensor(rewards),
                 torch.tensor(discounts), torch.randn(n, *OBS, generator=g))


def pinned(head: str, outputs: list[list[float]], **kwargs):
    """An MLP network whose head outputs ``outputs`` (per action) for any observation."""
    net = build_network(OBS, len(outputs), torso="mlp", head=head, **kwargs)
    last = net.out_stream[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(outputs).flatten())
    return net


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


def test_huber_values_and_clipped_gradient():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    loss = huber(x)
    torch.testing.assert_close(loss, torch.tensor([2.5, 0.5, 0.125, 0.0, 0.125, 1.5]))
    loss.sum().backward()
    # Nature DQN's error clipping: the gradient is the TD error clipped to [-1, 1].
    torch.testing.assert_close(x.grad, torch.tensor([-1.0, -1.0, -0.5, 0.0, 0.5, 1.0]))
    assert huber(torch.tensor(3.0), delta=2.0).item() == pytest.approx(2.0 * (3.0 - 1.0))
    with pytest.raises(ValueError):
        huber(x, delta=0.0)


def test_double_q_selects_with_online_and_evaluates_with_target():
    q_t_target = torch.tensor([[1.0, 5.0, 2.0], [0.0, -1.0, 4.0]])
    q_t_online = torch.tensor([[3.0, 0.0, 1.0], [0.0, 9.0, 1.0]])
    reward, discount = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])
    # Plain: max_a Q_target = 5, 4.
    torch.testing.assert_close(q_learning_targets(reward, discount, q_t_target), torch.tensor([1 + 0.5 * 5, 4.0]))
    # Double: online argmax = 0, 1; target's values there = 1, -1.
    torch.testing.assert_close(q_learning_targets(reward, discount, q_t_target, q_t_online),
                               torch.tensor([1 + 0.5 * 1, -1.0]))


def test_categorical_projection_three_atoms_by_hand():
    support = torch.tensor([-1.0, 0.0, 1.0])  # dz = 1
    probs = torch.tensor([
        [0.2, 0.3, 0.5],  # r = 0.5, discount 1: Tz = (-0.5, 0.5, 1.5 -> clipped to 1)
        [0.6, 0.4, 0.0],  # r = 0, discount 0.5: Tz = (-0.5, 0, 0.5)
        [0.2, 0.3, 0.5],  # terminal, r = 0.3: all mass at 0.3, split 0.7 / 0.3 between atoms 0 and 1
        [0.2, 0.3, 0.5],  # terminal, r = -2.5: clipped to -1, all mass on the first atom
        [0.2, 0.3, 0.5],  # terminal, r = 1: exactly on the last atom
    ])
    reward = torch.tensor([0.5, 0.0, 0.3, -2.5, 1.0])
    discount = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0])
    expected = torch.tensor([
        # -0.5 gives 0.2 half to -1 and half to 0; 0.5 gives 0.3 half to 0 and half to 1; 1 keeps 0.5.
        [0.1, 0.1 + 0.15, 0.15 + 0.5],
        # -0.5 gives 0.6 half to -1 and half to 0; 0 keeps 0.4; 0.5 carries no mass.
        [0.3, 0.3 + 0.4, 0.0],
        [0.0, 0.7, 0.3],
        [1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0],
    ])
    m = categorical_projection(probs, reward, discount, support)
    torch.testing.assert_close(m, expected)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(5))


def test_categorical_projection_on_the_c51_support():
    support = torch.linspace(-10.0, 10.0, 51)
    probs = torch.softmax(torch.randn(4, 51), dim=1)
    zero = torch.zeros(4)
    # r = 0, discount 1 is the identity.
    torch.testing.assert_close(categorical_projection(probs, zero, torch.ones(4), support), probs)
    # A shift by one atom (0.4) moves every mass one atom up; the top atom keeps its own and the one below.
    m = categorical_projection(probs, torch.full((4,), 0.4), torch.ones(4), support)
    torch.testing.assert_close(m[:, 0], zero, atol=1e-5, rtol=0)
    torch.testing.assert_close(m[:, 1:50], probs[:, :49], atol=1e-5, rtol=0)
    torch.testing.assert_close(m[:, 50], probs[:, 49] + probs[:, 50], atol=1e-5, rtol=0)


def test_quantile_huber_loss_two_quantiles_by_hand():
    taus = torch.tensor([0.25, 0.75])
    pred = torch.tensor([[0.0, 1.0]])
    target = torch.tensor([[0.5, 3.0]])
    # u_ij = target_j - pred_i.
    # i=0 (tau .25, pred 0): u = 0.5, 3 (both >= 0, weight .25): .25*.125 = .03125, .25*2.5 = .625 -> mean .328125
    # i=1 (tau .75, pred 1): u = -.5 (weight |.75-1| = .25): .25*.125 = .03125; u = 2 (weight .75): .75*1.5 = 1.125
    #   -> mean .578125.   Sum over i: .90625
    torch.testing.assert_close(quantile_huber_loss(pred, target, taus), torch.tensor([0.90625]))
    torch.testing.assert_close(quantile_huber_loss(pred, target, taus[None]), torch.tensor([0.90625]))
    # kappa = 0: plain quantile loss. i=0: .25*(.5 + 3)/2 = .4375; i=1: (.25*.5 + .75*2)/2 = .8125. Sum 1.25.
    torch.testing.assert_close(quantile_huber_loss(pred, target, taus, kappa=0.0), torch.tensor([1.25]))
    # kappa = 2 (L_kappa / kappa): i=0: .25*(.125 + 2*(3-1))/2/2 = .2578125; i=1: (.25*.125 + .75*2)/2/2 = .3828125
    torch.testing.assert_close(quantile_huber_loss(pred, target, taus, kappa=2.0), torch.tensor([0.640625]))


def test_quantile_loss_ignores_order_and_vanishes_at_a_matching_constant():
    g = torch.Generator().manual_seed(0)
    pred, target, taus = torch.randn(3, 5, generator=g), torch.randn(3, 7, generator=g), torch.rand(3, 5, generator=g)
    loss = quantile_huber_loss(pred, target, taus)
    p, q = torch.randperm(5, generator=g), torch.randperm(7, generator=g)
    torch.testing.assert_close(quantile_huber_loss(pred[:, p], target[:, q], taus[:, p]), loss)
    const = torch.full((3, 5), 2.0)
    torch.testing.assert_close(quantile_huber_loss(const, torch.full((3, 7), 2.0), taus), torch.zeros(3))
    with pytest.raises(ValueError, match="taus"):
        quantile_huber_loss(pred, target, torch.rand(4))


def test_quantile_loss_minimiser_is_the_quantile():
    # Behaviour, not algebra: minimising the loss moves each prediction to its tau-quantile of the targets.
    target = torch.arange(100.0)[None]  # empirical quantiles: tau * 100
    taus = torch.tensor([0.1, 0.5, 0.9])
    pred = torch.zeros(1, 3, requires_grad=True)
    opt = torch.optim.Adam([pred], lr=1.0)
    for _ in range(400):
        opt.zero_grad()
        quantile_huber_loss(pred, target, taus).sum().backward()
        opt.step()
    torch.testing.assert_close(pred.detach(), torch.tensor([[10.0, 50.0, 90.0]]), atol=1.5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# td_loss per head, on pinned networks
# ---------------------------------------------------------------------------------------------------------


def test_td_loss_q_head_plain_and_double():
    online = pinned("q", [[3.0], [0.0], [1.0]])
    target = pinned("q", [[1.0], [5.0], [2.0]])
    batch = batch_of([2], [1.0], [0.5])
    # Q(s, a=2) = 1. Plain target 1 + .5*5 = 3.5: td 2.5, Huber 2.0. Double: online argmax 0 -> 1 + .5*1 = 1.5: td .5.
    out = td_loss(online, target, batch, double=False, head="q")
    assert isinstance(out, LossOut)
    torch.testing.assert_close(out.loss, torch.tensor([2.0]))
    torch.testing.assert_close(out.priority, torch.tensor([2.5]))
    torch.testing.assert_close(out.q_tm1, torch.tensor([1.0]))
    out = td_loss(online, target, batch, double=True, head="q")
    torch.testing.assert_close(out.loss, torch.tensor([0.125]))
    torch.testing.assert_close(out.priority, torch.tensor([0.5]))
    assert out.loss.requires_grad and not out.priority.requires_grad and not out.q_tm1.requires_grad


def test_td_loss_c51_plain_and_double_on_three_atoms():
    three = dict(num_atoms=3, v_min=-1.0, v_max=1.0)
    ln4 = math.log(4.0)
    # online: a0 probs (2/3, 1/6, 1/6) (Q = -.5), a1 uniform (Q = 0) -> online argmax 1.
    online = pinned("c51", [[ln4, 0.0, 0.0], [0.0, 0.0, 0.0]], **three)
    # target: a0 probs (1/6, 1/6, 2/3) (Q = .5), a1 uniform (Q = 0) -> target argmax 0.
    target = pinned("c51", [[0.0, 0.0, ln4], [0.0, 0.0, 0.0]], **three)
    batch = batch_of([0], [0.5], [1.0])
    log_p = torch.tensor([2 / 3, 1 / 6, 1 / 6]).log()
    # Plain: project (1/6, 1/6, 2/3) shifted by .5 -> (1/12, 1/12 + 1/12, 1/12 + 2/3).
    m_plain = torch.tensor([1 / 12, 1 / 6, 3 / 4])
    out = td_loss(online, target, batch, double=False, head="c51")
    torch.testing.assert_close(out.loss, -(m_plain * log_p).sum(dim=0, keepdim=True))
    torch.testing.assert_close(out.priority, out.loss.detach())
    torch.testing.assert_close(out.q_tm1, torch.tensor([-0.5]))
    # Double: target's a1 (uniform) shifted by .5 -> (1/6, 1/6 + 1/6, 1/6 + 1/3).
    m_double = torch.tensor([1 / 6, 1 / 3, 1 / 2])
    out = td_loss(online, target, batch, double=True, head="c51")
    torch.testing.assert_close(out.loss, -(m_double * log_p).sum(dim=0, keepdim=True))


def test_td_loss_qr_plain_and_double_on_two_quantiles():
    # N = 2: taus (.25, .75).
    online = pinned("qr", [[0.0, 1.0], [2.0, 2.0]], num_quantiles=2)  # online argmax 1
    target = pinned("qr", [[0.0, 2.5], [-1.0, -1.0]], num_quantiles=2)  # target argmax 0
    batch = batch_of([0], [0.5], [1.0])
    # Plain: targets .5 + (0, 2.5) = (.5, 3) against (0, 1): the hand example above, .90625.
    out = td_loss(online, target, batch, double=False, head="qr")
    torch.testing.assert_close(out.loss, torch.tensor([0.90625]))
    torch.testing.assert_close(out.q_tm1, torch.tensor([0.5]))
    # Double: targets .5 + (-1, -1) = (-.5, -.5). i=0: u = -.5, weight .75, Huber .125 -> .09375;
    # i=1: u = -1.5, weight .25, Huber 1.0 -> .25. Sum .34375.
    out = td_loss(online, target, batch, double=True, head="qr")
    torch.testing.assert_close(out.loss, torch.tensor([0.34375]))
    torch.testing.assert_close(out.priority, out.loss)


@pytest.mark.parametrize("double", [False, True])
def test_td_loss_iqn_vanishes_when_the_target_equals_the_prediction(double):
    # Pinned heads give the same value at every tau. Online Q(s, a0) = 2 at all taus; target's greedy action a1
    # has 2 too, so with r = 1, discount .5: y = 1 + .5*2 = 2 = prediction. The terminal sample has r = 2.
    online = pinned("iqn", [[2.0], [0.0]])
    target = pinned("iqn", [[-3.0], [2.0]])
    if double:
        online = pinned("iqn", [[2.0], [3.0]])  # online picks a1 as well
    batch = batch_of([0, 0], [1.0, 2.0], [0.5, 0.0])
    out = td_loss(online, target, batch, double=double, head="iqn")
    torch.testing.assert_close(out.loss, torch.zeros(2))
    # ... and is positive when it does not.
    batch = batch_of([0, 0], [1.5, 2.5], [0.5, 0.0])
    assert (td_loss(online, target, batch, double=double, head="iqn").loss > 0.1).all()


def test_td_loss_iqn_uses_n_and_n_prime_taus_and_k_for_the_greedy_action():
    torch.manual_seed(0)
    online = build_network(OBS, 3, torso="mlp", head="iqn")
    target = copy.deepcopy(online)
    with torch.no_grad():  # make quantiles depend strongly on tau, so K and N' samples can disagree on argmax
        target.tau_embedding.linear.weight.mul_(30.0)
    n = 64
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.randn(n, *OBS, generator=g), torch.randint(0, 3, (n,), generator=g),
                  torch.randn(n, generator=g), torch.full((n,), 0.9), torch.randn(n, *OBS, generator=g))
    # Recompute the loss from the same RNG draws: N = 1 online tau, then K + N' = 32 + 3 target taus, of which
    # the first K choose the greedy action (Dabney et al. 2018b, Algorithm 1) and the last N' are the targets.
    torch.manual_seed(5)
    out = td_loss(online, target, batch, double=False, head="iqn", iqn_num_taus=1, iqn_num_taus_target=3)
    torch.manual_seed(5)
    pred = online(batch.obs_tm1, num_taus=1)
    dist_t = target(batch.obs_t, num_taus=32 + 3).dist
    a_t = dist_t[..., :32].mean(-1).argmax(1)
    assert (a_t != dist_t[..., 32:].mean(-1).argmax(1)).any()  # the check below can tell the two apart
    rows = torch.arange(n)
    y = batch.reward_t[:, None] + batch.discount_t[:, None] * dist_t[rows, a_t][:, 32:]
    expected = quantile_huber_loss(pred.dist[rows, batch.action_tm1], y, pred.taus)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("head", ["q", "c51", "qr", "iqn"])
def test_zero_discount_kills_the_bootstrap_for_every_head(head):
    torch.manual_seed(0)
    online = build_network(OBS, 3, torso="mlp", head=head)
    target_a = build_network(OBS, 3, torso="mlp", head=head)
    target_b = build_network(OBS, 3, torso="mlp", head=head)

    def loss(target, discount, double):
        batch = batch_of([0, 2, 1], [1.0, -0.5, 0.25], [discount] * 3)
        torch.manual_seed(1)  # same IQN taus in every call
        return td_loss(online, target, batch, double=double, head=head).loss

    for double in (False, True):
        torch.testing.assert_close(loss(target_a, 0.0, double), loss(target_b, 0.0, double))
        assert (loss(target_a, 0.99, double) - loss(target_b, 0.99, double)).abs().max() > 1e-4


def test_td_loss_rejects_mismatched_inputs():
    online = build_network(OBS, 3, torso="mlp", head="qr")
    batch = batch_of([0, 1], [0.0, 1.0], [0.9, 0.0])
    with pytest.raises(ValueError, match="head"):
        td_loss(online, online, batch, double=False, head="c51")
    with pytest.raises(ValueError, match="int64"):
        td_loss(online, online, batch._replace(action_tm1=batch.action_tm1.int()), double=False, head="qr")
    with pytest.raises(ValueError, match="reward_t"):
        td_loss(online, online, batch._replace(reward_t=torch.zeros(2, 1)), double=False, head="qr")


# ---------------------------------------------------------------------------------------------------------
# A real (short) optimisation per head
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads contending
    with other processes made this test ~15x slower; restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("head, dueling, noisy", [
    ("q", False, False), ("q", True, False), ("c51", False, False), ("c51", True, True),  # the last is Rainbow's
    ("qr", False, False), ("iqn", False, False),
])
def test_adam_fits_a_fixed_batch(head, dueling, noisy):
    torch.manual_seed(0)
    online = build_network(OBS, 3, torso="mlp", mlp_hidden=(64, 64), head=head, dueling=dueling, noisy=noisy,
                           num_quantiles=16)
    assert noisy == any(isinstance(m, NoisyLinear) for m in online.modules())  # Rainbow's row fits noisy layers
    target = copy.deepcopy(online)
    g = torch.Generator().manual_seed(1)
    n = 32
    batch = Batch(torch.randn(n, *OBS, generator=g), torch.randint(0, 3, (n,), generator=g),
                  torch.randn(n, generator=g) * 2.0, torch.where(torch.rand(n, generator=g) < 0.25, 0.0, 0.9),
                  torch.randn(n, *OBS, generator=g))
    opt = torch.optim.Adam(online.parameters(), lr=1e-3)
    losses = []
    for _ in range(400):
        if noisy:
            online.reset_noise()
        loss = td_loss(online, target, batch, double=True, head=head).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    if head == "c51":
        # The cross-entropy is bounded below by the target's entropy, not by 0: compare the excess over it.
        with torch.no_grad():
            floor = _c51_target_entropy(online, target, batch)
        first, last = first - floor, last - floor
    assert last < 0.1 * first, (first, last)


def _c51_target_entropy(online, target, batch) -> float:
    online.set_noise(False)
    a_t = online(batch.obs_t).q.argmax(1)
    online.set_noise(True)
    p_t = target(batch.obs_t).dist[torch.arange(len(a_t)), a_t].softmax(-1)
    m = categorical_projection(p_t, batch.reward_t, batch.discount_t, target.support)
    return float(-(m * m.clamp_min(1e-12).log()).sum(-1).mean())
