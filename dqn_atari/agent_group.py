"""The agents of K independent runs trained in one process, acting and learning as one.

Each run keeps its own :class:`~dqn_atari.agent.Agent` (networks, optimizer, acting RNG), so everything that
works on one run (evaluation, checkpoints, target syncs) works unchanged. What the group adds is speed: the
K agents' parameters, buffers and optimizer states are stacked along a new first dimension, and each agent's
tensors become views of its slice (``tie``). Then

- acting is one network evaluation for all runs: ``vmap`` of ``functional_call`` over the stacked weights;
- a training step is one batched update: ``vmap(grad(loss))`` over the K runs' replay batches, then one
  optimizer step on the stacked tensors (the optimizers are elementwise, so the stacked step computes
  exactly what K separate steps would).

Nothing is shared between runs: every run samples its own replay, draws from its own RNG streams and gets
its own gradient. On CPU the batched convolutions differ from K separate ones in the last bits of float32
(a grouped convolution sums in another order), so K runs in one process equal K single runs within float
tolerance, not bit for bit (tests/test_runs_per_process.py). A group of one agent, IQN (whose network
draws quantile fractions inside its forward pass) and the Nature CNN on CPU (where batching is slower) simply
call each agent in turn: see :func:`batch_runs`.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dqn_atari.agent import Agent, make_optimizer, update_loss
from dqn_atari.cuda_graphs import Graphed


class _Bound:
    """A network called with given parameters and buffers (stacked slices under vmap); its other attributes
    (head, support, ...) are the module's, which td_loss reads."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]):
        self._module, self._tensors = module, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._module, self._tensors, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _stack_into(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Stack the modules' parameters and buffers along a new dimension 0 and make each module's tensors
    views of its slice (parameters stay nn.Parameters). Returns the stacked tensors by name."""
    named = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in modules]
    stacked = {name: torch.stack([n[name].detach() for n in named]) for name in named[0]}
    for k, module in enumerate(modules):
        for name, tensor in stacked.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(tensor[k], requires_grad=owner._parameters[leaf].requires_grad)
            else:
                owner._buffers[leaf] = tensor[k]
    return stacked


def batch_runs(cfg: Any, device: torch.device) -> bool:
    """Whether K runs with these settings act and learn as one vmapped call, or one run after the other
    (the same computation; each run's results are then bit-identical to training it alone).

    - IQN samples its quantile fractions inside the forward pass, from each run's own torch stream: that
      cannot be one vmapped call.
    - The Nature CNN on CPU: oneDNN runs K stacked weight sets as one grouped convolution, which is slower
      than K separate ones (``scripts/bench_train.py --k 2``: a batched update of 2 runs took 110 ms against
      40 ms for one run on the 2-core CPU), so CPU runs take turns. On a GPU, batching is the point.
    """
    if cfg.network.head == "iqn":
        return False
    return not (device.type == "cpu" and cfg.network.torso == "nature_cnn")


class AgentGroup:
    """K agents with identical settings (seeds and games may differ); see the module docstring.

    ``rng_scopes[k]()`` is a context in which torch's global RNG is run k's own stream; it is entered around
    the only calls that draw from it (noise resets and IQN's quantile fractions)."""

    def __init__(self, agents: list[Agent], rng_scopes: list[Callable[[], ContextManager]] | None = None):
        self.agents = agents
        self.scopes = rng_scopes or [nullcontext] * len(agents)
        self.cfg = agents[0].cfg
        self.device = agents[0].device
        self.batched = len(agents) > 1 and batch_runs(self.cfg, self.device)
        if self.batched:
            self._tie()
            self._graphs = [Graphed(self._step), Graphed(self._greedy)] if self.cfg.cuda_graph else None

    # -- stacking -----------------------------------------------------------------------------------------
    def _tie(self) -> None:
        agents = self.agents
        for agent in agents:  # their parameters are about to become views of the stacked ones
            agent.reset_graphs()
        # The optimizers' states (empty before the first update) are stacked like the parameters.
        old_params = [list(a.online.parameters()) for a in agents]
        old_states = [[a.optimizer.state.get(p, {}) for p in params] for a, params in zip(agents, old_params)]
        self.online = _stack_into([a.online for a in agents])
        self.target = _stack_into([a.target for a in agents])
        self.param_names = [name for name, _ in agents[0].online.named_parameters()]
        self.params = [self.online[name] for name in self.param_names]
        self.optimizer = make_optimizer(self.params, self.cfg)
        for i, p in enumerate(self.params):
            per_run = [states[i] for states in old_states]
            if per_run[0]:
                self.optimizer.state[p] = {key: _stack_state([s[key] for s in per_run]) for key in per_run[0]}
        self._share_optimizer_state()

    def _share_optimizer_state(self) -> None:
        """Point each agent's optimizer at its own (views of the) stacked parameters and states, so that
        saving one run's checkpoint reads its slice."""
        for k, agent in enumerate(self.agents):
            params = list(agent.online.parameters())
            agent.optimizer.param_groups[0]["params"] = params
            agent.optimizer.state = defaultdict(dict)
            for p_run, p in zip(params, self.params):
                state = self.optimizer.state.get(p, {})
                agent.optimizer.state[p_run] = {key: v[k] if v.dim() > 0 else v for key, v in state.items()}
        self._state_shared = bool(self.optimizer.state)

    # -- acting -------------------------------------------------------------------------------------------
    def act(self, obs: list[np.ndarray], epsilons: list[float]) -> list[np.ndarray]:
        """Epsilon-greedy actions of every run, each from its own RNG stream: exactly ``agent.act`` per run,
        with one network evaluation for all runs that need the greedy action."""
        draws = [a.explore(o.shape[0], eps) for a, o, eps in zip(self.agents, obs, epsilons)]
        needed = [not explore.all() for explore, _ in draws]
        if not any(needed):
            return [random_actions for _, random_actions in draws]
        greedy = self.greedy(obs, needed)
        return [np.where(explore, random_actions, g).astype(np.int64) if need else random_actions
                for (explore, random_actions), g, need in zip(draws, greedy, needed)]

    @torch.no_grad()
    def greedy(self, obs: list[np.ndarray], needed: list[bool]) -> list[np.ndarray | None]:
        """Greedy actions of the runs that need them (the batched evaluation computes all: it draws nothing)."""
        if not self.batched:
            out = []
            for agent, o, scope, need in zip(self.agents, obs, self.scopes, needed):
                with scope():  # IQN draws its quantile fractions here, from this run's stream only when it acts
                    out.append(agent.greedy(o) if need else None)
            return out
        x = torch.as_tensor(np.stack(obs), device=self.device)
        return list((self._graphs[1](x) if self._graphs else self._greedy(x)).cpu().numpy())

    def _greedy(self, x: torch.Tensor) -> torch.Tensor:
        module = self.agents[0].online
        q = vmap(lambda tensors, o: functional_call(module, tensors, (o,)).q)(self.online, x)
        return q.argmax(dim=2)

    # -- learning -----------------------------------------------------------------------------------------
    def update(self, batches: list[Any]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """One gradient step of every run on its own batch; (stats, priorities) per run, as ``Agent.update``."""
        if not self.batched:
            out = []
            for agent, batch, scope in zip(self.agents, batches, self.scopes):
                with scope():
                    out.append(agent.update(batch))
            return out
        cfg = self.cfg
        if cfg.network.noisy:
            # Fresh noise per run and update, from each run's own stream (Agent.update says why).
            for agent, scope in zip(self.agents, self.scopes):
                with scope():
                    agent.online.reset_noise()
                    agent.target.reset_noise()
        batch = _stack_batches(batches, self.device)
        loss, priority, q_tm1 = self._graphs[0](batch) if self._graphs else self._step(batch)
        if not self._state_shared:  # the optimizer's state exists from its first step on
            self._share_optimizer_state()
        for agent in self.agents:
            agent.updates += 1
        q_mean, q_max, q_min = q_tm1.mean(dim=1), q_tm1.amax(dim=1), q_tm1.amin(dim=1)
        return [({"loss": loss[k], "q_mean": q_mean[k], "q_max": q_max[k], "q_min": q_min[k]}, priority[k])
                for k in range(len(self.agents))]

    def _step(self, batch: Any) -> tuple[torch.Tensor, ...]:
        """The batched update's tensor work: every run's gradient, then one optimizer step on the stacked
        tensors. Returns the runs' (loss, priority, q_tm1), stacked."""
        grads, aux = vmap(self._grad)(self.online, self.target, batch)
        for p, g in zip(self.params, grads):
            p.grad = g
        self.optimizer.step()
        return aux

    def _grad(self, online: dict, target: dict, batch: Any) -> tuple[list[torch.Tensor], tuple]:
        """One run's gradient (vmapped over runs): Agent.update's loss, reduction and gradient clipping."""
        cfg = self.cfg
        a0 = self.agents[0]

        def loss_fn(params: dict) -> tuple[torch.Tensor, tuple]:
            loss, priority, q_tm1 = update_loss(_Bound(a0.online, {**online, **params}), _Bound(a0.target, target),
                                                batch, **a0.loss_args)
            return loss, (loss.detach(), priority, q_tm1)

        params = {name: online[name] for name in self.param_names}
        grads, aux = grad(loss_fn, has_aux=True)(params)
        grads = [grads[name] for name in self.param_names]
        if cfg.agent.max_grad_norm > 0:
            # nn.utils.clip_grad_norm_'s rule, per run: scale by max_norm / (total norm + 1e-6) when below 1.
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = (cfg.agent.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
            grads = [g * scale for g in grads]
        return grads, aux


def _stack_state(values: list[Any]) -> Any:
    """Stack one optimizer-state entry of K runs; a scalar (Adam's step count) is the same for all runs."""
    first = torch.as_tensor(values[0])
    if first.dim() == 0:
        if any(float(v) != float(first) for v in values):
            raise ValueError(f"The runs' optimizer step counts differ ({[float(v) for v in values]}); runs trained "
                             f"together must be at the same update.")
        return first.clone()
    return torch.stack(values)


def _stack_batches(batches: list[Any], device: torch.device) -> Any:
    fields = {}
    for name in batches[0]._fields:
        values = [getattr(b, name) for b in batches]
        stacked = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.from_numpy(np.stack(values))
        fields[name] = stacked.to(device, non_blocking=True)
    return type(batches[0])(**fields)
