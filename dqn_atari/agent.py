"""The agent: acting (epsilon-greedy or noisy) and one learning update, for every variant.

Variants are switches on this one agent (see ``configs/``): the network head and flags come from
``network.*``, the target rule (double, n-step via the replay's returns) from ``agent.*``, and the loss
dispatch lives in :func:`dqn_atari.losses.td_loss`.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from dqn_atari.config import Config
from dqn_atari.cuda_graphs import Graphed
from dqn_atari.losses import td_loss
from dqn_atari.networks import build_network


class NatureRMSprop(torch.optim.Optimizer):
    """Centered RMSProp exactly as in DeepMind's Nature DQN code (NeuralQLearner.lua):

        g  <- decay * g  + (1 - decay) * grad
        g2 <- decay * g2 + (1 - decay) * grad^2
        w  <- w - lr * grad / sqrt(g2 - g^2 + eps)

    with decay 0.95 ("gradient momentum" and "squared gradient momentum") and eps 0.01 ("min squared
    gradient") under the square root (Mnih et al. 2015, Ext. Data Table 1). PyTorch's
    ``RMSprop(centered=True)`` adds eps outside the root, which is a different optimizer at eps = 0.01.
    There is no momentum term in DeepMind's code.
    """

    def __init__(self, params, lr: float = 0.00025, decay: float = 0.95, eps: float = 0.01, compiled: bool = False):
        super().__init__(params, dict(lr=lr, decay=decay, eps=eps))
        self._update = compiled_fn(_nature_rmsprop_) if compiled else _nature_rmsprop_

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["g"] = torch.zeros_like(p)
                    self.state[p]["g2"] = torch.zeros_like(p)
            self._update(params, [p.grad for p in params], [self.state[p]["g"] for p in params],
                         [self.state[p]["g2"] for p in params], group["lr"], group["decay"], group["eps"])
        return None


def _nature_rmsprop_(params, grads, g, g2, lr: float, decay: float, eps: float) -> None:
    """NatureRMSprop's update of ``params`` and its statistics ``g``, ``g2``, in place."""
    torch._foreach_lerp_(g, grads, 1.0 - decay)
    torch._foreach_mul_(g2, decay)
    torch._foreach_addcmul_(g2, grads, grads, value=1.0 - decay)
    denom = torch._foreach_addcmul(g2, g, g, value=-1.0)
    torch._foreach_add_(denom, eps)
    torch._foreach_sqrt_(denom)
    torch._foreach_addcdiv_(params, grads, denom, value=-lr)


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    a = cfg.agent
    if a.optimizer == "rmsprop_nature":
        return NatureRMSprop(params, lr=a.lr, decay=a.rms_decay, eps=a.rms_eps, compiled=cfg.compile)
    # Rainbow (Hessel et al. 2018, Table 1): Adam with lr 6.25e-5 and eps 1.5e-4. capturable: its step count
    # lives on the device, so that a CUDA graph can replay the step (the same update, its bias corrections
    # rounded in float32 on the device instead of in Python's doubles).
    return torch.optim.Adam(params, lr=a.lr, eps=a.adam_eps, capturable=cfg.cuda_graph)


@functools.cache
def compiled_fn(fn):
    """``fn`` through torch.compile (config ``compile=true``): one compiled function shared by every agent of
    the process, so K runs do not compile K times (modules are passed in, not closed over)."""
    import torch._inductor.config  # here, not at the top: importing it costs ~2 s, which compile=false need not pay

    # Random ops inside a compiled graph (IQN's quantile fractions) draw from torch's generator as eager does.
    torch._inductor.config.fallback_random = True
    return torch.compile(fn)


def check_compile(device: torch.device) -> None:
    """A clear error, before any work, where ``compile=true`` cannot work: on CPU it needs a C++ compiler."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # torch raises a RuntimeError naming the compilers it tried
        raise ValueError(f"compile=true on CPU needs a C++ compiler (g++ or clang++), and none works here ({exc}). "
                         f"Install one (e.g. apt install g++), or set compile=false.") from None


def resolve_device(name: str) -> torch.device:
    """The torch device of ``device=`` (auto: CUDA when there is a GPU). On CUDA, cuDNN's TF32 convolutions are
    turned off: torch enables them by default (its matrix products stay float32), which would round each
    convolution's inputs to 10 mantissa bits. Float32 throughout is what the papers computed with."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} was asked for but torch sees no CUDA GPU; use device=cpu or device=auto.")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={name}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
        torch.backends.cudnn.allow_tf32 = False
    return device


def update_loss(online: nn.Module, target: nn.Module, b, *, double: bool, head: str, iqn_num_taus: int,
                iqn_num_taus_target: int, kappa: float, reduction: str) -> tuple[torch.Tensor, ...]:
    """The differentiable part of an update: the per-sample loss of dqn_atari.losses.td_loss, weighted by the
    replay's importance weights and reduced. Returns (loss, priority, q_tm1)."""
    out = td_loss(online, target, b, double=double, head=head, iqn_num_taus=iqn_num_taus,
                  iqn_num_taus_target=iqn_num_taus_target, kappa=kappa)
    weighted = out.loss * b.weights
    loss = weighted.sum() if reduction == "sum" else weighted.mean()
    return loss, out.priority, out.q_tm1


def greedy_actions(online: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each observation's greedy action under ``online`` (through torch.compile with ``compile=true``: one fused
    graph is ~0.05 ms quicker per batch-1 action than the layers called one by one on a 2-core CPU)."""
    return online(x).q.argmax(dim=1)


def update_loss_args(cfg: Config) -> dict[str, Any]:
    """The keyword arguments of :func:`update_loss` that come from the config (the same for every update)."""
    n = cfg.network
    return dict(double=cfg.agent.double, head=n.head, iqn_num_taus=n.iqn_num_taus,
                iqn_num_taus_target=n.iqn_num_taus_target, kappa=n.kappa, reduction=cfg.agent.loss_reduction)


class Agent:
    """Online and target networks, the optimizer and the acting RNG of one run."""

    def __init__(self, cfg: Config, obs_shape: tuple[int, ...], num_actions: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.num_actions = num_actions
        self.device = torch.device(device)
        if cfg.compile:
            check_compile(self.device)
        if cfg.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=true needs a CUDA device, and this run is on {self.device}: set device=cuda "
                             f"(or auto on a machine with a GPU), or cuda_graph=false.")
        n = cfg.network
        self.online = build_network(
            tuple(obs_shape), num_actions, torso=n.torso, mlp_hidden=tuple(n.mlp_hidden), head=n.head,
            dueling=n.dueling, noisy=n.noisy, noisy_sigma0=n.noisy_sigma0, hidden=n.hidden,
            num_atoms=n.num_atoms, v_min=n.v_min, v_max=n.v_max, num_quantiles=n.num_quantiles,
            iqn_embedding_dim=n.iqn_embedding_dim, iqn_num_taus_act=n.iqn_num_taus_act,
        ).to(self.device)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        self.optimizer = make_optimizer(self.online.parameters(), cfg)
        self._loss = compiled_fn(update_loss) if cfg.compile else update_loss
        self._greedy_actions = compiled_fn(greedy_actions) if cfg.compile else greedy_actions
        self.loss_args = update_loss_args(cfg)
        # Acting randomness (epsilon draws and random actions) has its own stream, saved in checkpoints.
        self.rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xAC7]))
        self.updates = 0
        # cuda_graph=true: this agent's update and greedy action replay CUDA graphs (dqn_atari.cuda_graphs). K runs
        # trained together learn and act through the group's own graphs instead.
        self._graphs = [Graphed(self._step), Graphed(self._greedy)] if cfg.cuda_graph else None

    def reset_graphs(self) -> None:
        """Forget the captured graphs (after the optimizer's state or the parameters were replaced)."""
        for graph in self._graphs or []:
            graph.reset()

    # -- acting ------------------------------------------------------------------------------------------
    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        """Image batches on CPU in channels-last (NHWC) layout: oneDNN's convolutions run ~10 % faster on it.
        The uint8 frames are permuted (4x less to copy than floats), unless the replay already gathered them
        that way (the trainer asks it to: FrameRing.gather); values and arithmetic are unchanged."""
        if x.device.type == "cpu" and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        x = self._frames(torch.as_tensor(obs, device=self.device))
        return (self._graphs[1](x) if self._graphs else self._greedy(x)).cpu().numpy()

    def _greedy(self, x: torch.Tensor) -> torch.Tensor:
        return self._greedy_actions(self.online, x)

    def act(self, obs: np.ndarray, epsilon: float, rng: np.random.Generator | None = None) -> np.ndarray:
        """Epsilon-greedy over the batch of observations, drawing from ``rng`` (default: the training
        stream). The same random numbers are drawn whatever epsilon is, so the stream's position depends only
        on the step count; the network is skipped when every action is random."""
        explore, random_actions = self.explore(obs.shape[0], epsilon, rng)
        if explore.all():
            return random_actions
        return np.where(explore, random_actions, self.greedy(obs)).astype(np.int64)

    def explore(self, n: int, epsilon: float, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The random part of :meth:`act` for ``n`` envs: which of them act at random, and their random actions."""
        rng = self.rng if rng is None else rng
        explore = rng.random(n) < epsilon
        return explore, rng.integers(0, self.num_actions, size=n).astype(np.int64)

    # -- learning ----------------------------------------------------------------------------------------
    def _to_device(self, batch) -> Any:
        fields = {}
        for name, value in batch._asdict().items():
            t = torch.as_tensor(value)
            fields[name] = self._frames(t.to(self.device, non_blocking=True))
        return type(batch)(**fields)

    def update(self, batch) -> tuple[dict[str, float], np.ndarray]:
        """One gradient step on a replay batch. Returns (stats, new priorities for the sampled indices)."""
        cfg = self.cfg
        if cfg.network.noisy:
            # Fresh, independent noise for the online and the target network at every update
            # (Fortunato et al. 2018, Algorithm 1; Hessel et al. 2018). Acting uses the online noise until
            # the next update.
            self.online.reset_noise()
            self.target.reset_noise()
        b = self._to_device(batch)
        stats, priority = self._graphs[0](b) if self._graphs else self._step(b)
        self.updates += 1
        return stats, priority

    def _step(self, b) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The update's tensor work on a batch already on the device: loss, backward, optimizer step."""
        loss, priority, q_tm1 = self._loss(self.online, self.target, b, **self.loss_args)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.agent.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.agent.max_grad_norm)
        self.optimizer.step()
        stats = {"loss": loss.detach(), "q_mean": q_tm1.mean(), "q_max": q_tm1.max(), "q_min": q_tm1.min()}
        return stats, priority

    @torch.no_grad()
    def sync_target(self) -> None:
        tau = self.cfg.agent.target_tau
        if tau >= 1.0:
            self.target.load_state_dict(self.online.state_dict())
            return
        for t, o in zip(self.target.parameters(), self.online.parameters()):
            t.lerp_(o, tau)
        for t, o in zip(self.target.buffers(), self.online.buffers()):
            t.copy_(o)
