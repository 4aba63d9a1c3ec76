"""Targets and losses for every head: pure functions of tensors, per-sample (B,) outputs.

Conventions (time subscripts as in the design notes): ``reward_t`` is the (n-step, discounted) return
sum_{k<n} gamma^k r_{t+k}, and ``discount_t`` is gamma^n, or 0 when the episode terminated inside the window,
so every target is ``reward_t + discount_t * bootstrap(s_t)``; n-step (Sutton 1988; Hessel et al. 2018, Sec. 3)
needs nothing here beyond those two inputs.

The losses are per sample and unweighted: the agent multiplies by prioritized-replay importance weights and
reduces over the batch, and stores ``priority`` back into the replay.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from dqn_atari.networks import HEADS, QNetwork


class LossOut(NamedTuple):
    """loss: (B,) per-sample loss (unweighted, differentiable w.r.t. the online network).
    priority: (B,) detached; what prioritized replay stores: |TD error| for ``q``, the cross-entropy for ``c51``
      (Hessel et al. 2018, Sec. 3, prioritizes by the distributional loss; the paper writes KL, and Hessel's
      notes on the Kaixhin/Rainbow wiki say the cross-entropy was used), the per-sample loss for ``qr``/``iqn``.
    q_tm1: (B,) detached Q(s_tm1, a_tm1) (expectation for distributional heads), for diagnostics.
    """

    loss: Tensor
    priority: Tensor
    q_tm1: Tensor


def huber(x: Tensor, delta: float = 1.0) -> Tensor:
    """Elementwise Huber loss: x^2/2 for |x| <= delta, delta (|x| - delta/2) beyond.

    With delta = 1 its gradient is the TD error clipped to [-1, 1], which is Nature DQN's "error clipping"
    (Mnih et al. 2015, Methods, "Training algorithm for deep Q-networks").
    """
    if delta <= 0:
        raise ValueError(f"huber delta must be > 0, got {delta}.")
    abs_x = x.abs()
    quadratic = abs_x.clamp(max=delta)
    return 0.5 * quadratic.square() + delta * (abs_x - quadratic)


def q_learning_targets(reward_t: Tensor, discount_t: Tensor, q_t_target: Tensor,
                       q_t_online: Tensor | None = None) -> Tensor:
    """reward_t + discount_t * Q_target(s_t, a*), (B,).

    a* = argmax_a Q_target(s_t, a) (Mnih et al. 2015), or with ``q_t_online`` given, argmax_a Q_online(s_t, a):
    Double DQN selects with the online network and evaluates with the target network
    (van Hasselt et al. 2016, Eq. 4).
    """
    selector = q_t_target if q_t_online is None else q_t_online
    bootstrap = _take(q_t_target, selector.argmax(dim=1))
    return reward_t + discount_t * bootstrap


def categorical_projection(probs_t: Tensor, reward_t: Tensor, discount_t: Tensor, support: Tensor) -> Tensor:
    """Project the distribution r + discount * z (probabilities ``probs_t`` (B, K) on ``support`` (K,)) back onto
    ``support``; returns the (B, K) target distribution (Bellemare et al. 2017, Eq. 7 / Algorithm 1).

    Each shifted atom [r + discount z_j] is clipped to [v_min, v_max] and its mass split between the two nearest
    support atoms in proportion to closeness: m_i = sum_j [1 - |Tz_j - z_i| / dz]_0^1 p_j. At a terminal
    (discount 0) every atom lands on clip(r), so the mass goes to the support atom(s) bracketing clip(r).
    ``support`` must be evenly spaced (as C51's is).
    """
    delta_z = support[1] - support[0]
    tz = (reward_t.unsqueeze(1) + discount_t.unsqueeze(1) * support).clamp(min=support[0], max=support[-1])
    # weight[b, i, j]: share of source atom j's mass that lands on support atom i.
    weight = (1.0 - (tz.unsqueeze(1) - support.view(1, -1, 1)).abs() / delta_z).clamp(min=0.0, max=1.0)
    return (weight * probs_t.unsqueeze(1)).sum(dim=2)


def quantile_huber_loss(pred: Tensor, target: Tensor, taus: Tensor, kappa: float = 1.0) -> Tensor:
    """Quantile (Huber) regression loss, (B,).

    pred (B, N) are the quantile values at fractions ``taus`` ((N,) or (B, N)); target (B, N') are samples of
    the target distribution. With u_ij = target_j - pred_i:

        loss = sum_i mean_j |tau_i - 1{u_ij < 0}| * L_kappa(u_ij) / kappa

    (Dabney et al. 2018a, Eq. 10 and Algorithm 1; Dabney et al. 2018b, Eq. 3, which adds the 1/kappa; the two
    agree at the papers' kappa = 1). kappa = 0 gives the plain quantile regression loss with |u| in place of
    L_kappa/kappa. The order of the quantiles does not matter: the loss is a sum over (tau_i, pred_i) pairs and
    a mean over target samples.
    """
    if pred.dim() != 2 or target.dim() != 2 or pred.shape[0] != target.shape[0]:
        raise ValueError(f"quantile_huber_loss needs pred (B, N) and target (B, N'), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}.")
    if taus.shape not in (pred.shape[1:], pred.shape):
        raise ValueError(f"taus must have shape (N,) or (B, N) matching pred {tuple(pred.shape)}, "
                         f"got {tuple(taus.shape)}.")
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa}; the papers use 1.")
    u = target.unsqueeze(1) - pred.unsqueeze(2)  # (B, N, N')
    tau = taus.unsqueeze(-1) if taus.dim() == 2 else taus.view(1, -1, 1)
    weight = (tau - (u.detach() < 0).to(u.dtype)).abs()
    penalty = huber(u, kappa) / kappa if kappa > 0 else u.abs()
    return (weight * penalty).mean(dim=2).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# td_loss: forward passes + head dispatch
# ----------------------------------------------------------------------------------------------------------


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b]] for x of shape (B, A, ...) -> (B, ...)."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def _check(online: QNetwork, target: QNetwork, batch: Any, head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head={head!r} is unknown; choose one of {HEADS}.")
    for name, net in (("online", online), ("target", target)):
        if getattr(net, "head", None) != head:
            raise ValueError(f"td_loss(head={head!r}) but the {name} network was built with head="
                             f"{getattr(net, 'head', None)!r}; pass the same head to build_network and td_loss.")
    for field in ("obs_tm1", "action_tm1", "reward_t", "discount_t", "obs_t"):
        if not hasattr(batch, field):
            raise ValueError(f"batch lacks the field {field!r}; it needs obs_tm1, action_tm1, reward_t, discount_t, "
                             "obs_t.")
    action, reward, discount = batch.action_tm1, batch.reward_t, batch.discount_t
    if action.dtype != torch.int64:
        raise ValueError(f"batch.action_tm1 must be int64 (it indexes Q-values), got {action.dtype}.")
    size = batch.obs_tm1.shape[0]
    for name, t in (("action_tm1", action), ("reward_t", reward), ("discount_t", discount)):
        if tuple(t.shape) != (size,):
            raise ValueError(f"batch.{name} must have shape (B,) = ({size},), got {tuple(t.shape)}.")
    if not (reward.is_floating_point() and discount.is_floating_point()):
        raise ValueError(f"reward_t and discount_t must be float tensors, got {reward.dtype} and {discount.dtype}.")


def _next_action(online: QNetwork, obs_t: Tensor, target_q_t: Tensor, double: bool) -> Tensor:
    """Greedy action at s_t: target net's own argmax, or the online net's (Double DQN, van Hasselt et al. 2016;
    with distributions as in Rainbow, Hessel et al. 2018, Sec. 3 "Double Q-learning")."""
    return (online(obs_t).q if double else target_q_t).argmax(dim=1)


def td_loss(online: QNetwork, target: QNetwork, batch: Any, *, double: bool, head: str,
            iqn_num_taus: int = 64, iqn_num_taus_target: int = 64, kappa: float = 1.0) -> LossOut:
    """Per-sample loss for one replay batch, dispatching on ``head``.

    batch: attributes obs_tm1, action_tm1 (int64), reward_t (n-step return), discount_t (gamma^n, 0 at a
    terminal), obs_t, on the networks' device. Forward passes: online on obs_tm1 (with grad); target on obs_t
    and, only when ``double``, online on obs_t (both without grad).

    - ``q``: Huber(delta=1) of the TD error (Mnih et al. 2015 error clipping).
    - ``c51``: cross-entropy between the projected target distribution and the online one
      (Bellemare et al. 2017, Algorithm 1).
    - ``qr``: quantile Huber loss over N fixed midpoints (Dabney et al. 2018a, Algorithm 1).
    - ``iqn``: quantile Huber loss with ``iqn_num_taus`` = N online and ``iqn_num_taus_target`` = N' target taus
      ~ U(0, 1) (Dabney et al. 2018b, Sec. 4: N = N' = 64); the greedy next action averages over the network's
      own K = ``iqn_num_taus_act`` fresh taus (Algorithm 1).

    Noisy nets: this function never resamples noise; the agent owns that. Rainbow / NoisyNet-DQN use
    independent noise for the online and the target network (Fortunato et al. 2018, Sec. 3.1; Hessel et al.
    2018), one noise sample per batch, i.e. call ``online.reset_noise(); target.reset_noise()`` before each
    update. Here the online network's double-Q selection at s_t shares the online noise of the s_tm1 pass.
    """
    _check(online, target, batch, head)
    obs_tm1, action_tm1, reward_t, discount_t, obs_t = (
        batch.obs_tm1, batch.action_tm1, batch.reward_t, batch.discount_t, batch.obs_t)

    if head == "iqn":
        out_tm1 = online(obs_tm1, num_taus=iqn_num_taus)
    else:
        out_tm1 = online(obs_tm1)
    q_tm1 = _take(out_tm1.q, action_tm1).detach()

    if head == "q":
        with torch.no_grad():
            q_t_online = online(obs_t).q if double else None
            y = q_learning_targets(reward_t, discount_t, target(obs_t).q, q_t_online)
        td_error = y - _take(out_tm1.q, action_tm1)
        return LossOut(huber(td_error, 1.0), td_error.detach().abs(), q_tm1)

    if head == "c51":
        log_p_tm1 = _take(out_tm1.dist, action_tm1).log_softmax(dim=-1)
        with torch.no_grad():
            out_t = target(obs_t)
            a_t = _next_action(online, obs_t, out_t.q, double)
            m = categorical_projection(_take(out_t.dist, a_t).softmax(dim=-1), reward_t, discount_t, target.support)
        loss = -(m * log_p_tm1).sum(dim=-1)
        return LossOut(loss, loss.detach(), q_tm1)

    with torch.no_grad():
        if head == "qr":
            out_t = target(obs_t)
            quantiles_t = _take(out_t.dist, _next_action(online, obs_t, out_t.q, double))
        else:  # iqn
            k = target.iqn_num_taus_act
            if double:
                a_t = online(obs_t).q.argmax(dim=1)
                quantiles_t = _take(target(obs_t, num_taus=iqn_num_taus_target).dist, a_t)
            else:
                # One target pass at K + N' independent taus: the first K pick the action, the rest are targets.
                dist_t = target(obs_t, num_taus=k + iqn_num_taus_target).dist
                a_t = dist_t[..., :k].mean(dim=-1).argmax(dim=1)
                quantiles_t = _take(dist_t[..., k:], a_t)
        y = reward_t.unsqueeze(1) + discount_t.unsqueeze(1) * quantiles_t
    loss = quantile_huber_loss(_take(out_tm1.dist, action_tm1), y, out_tm1.taus, kappa)
    return LossOut(loss, loss.detach(), q_tm1)
