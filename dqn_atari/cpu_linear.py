"""Large float32 linear layers on CPU through oneDNN's matrix product instead of torch's BLAS.

torch's CPU builds do their matrix products in MKL, which on AMD processors runs its AVX2 code: ~180 GFLOP/s on
the Nature head's products (32 x 3136 by 3136 x 512) on the 2-core AMD EPYC of our development VM. oneDNN, which
torch already ships and uses for the convolutions, runs AVX-512 code there: the 3136 -> 512 layer's forward and
backward passes took 0.9 ms instead of 2.1, and a whole Nature update 8.7 ms instead of 10.7 (one-off timings,
2026-12-05). The products are the same, in float32; oneDNN sums in another order, so the last bits differ from
``F.linear``'s, as between any two BLAS libraries.

Layers route here (:func:`linear`) when they are large (:func:`worth_it`); on a GPU, for other dtypes, and where
oneDNN's product is missing or disagrees with ``F.linear`` (:func:`usable`, checked once per process), they use
``F.linear``. The product is a custom operator (``dqn_atari::linear``), so that ``torch.compile`` calls it as it is
(inductor's own lowering of oneDNN's linear expects frozen weights), inside an autograd function whose backward is
two more such products. Under ``vmap`` (K runs in one process, batched) each run's slice gets the product it gets
alone.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

MIN_WEIGHTS = 1 << 16
"""Layers with at least this many weights take oneDNN's product: the Nature head's 3136 x 512 layers (dueling and
noisy ones too) and IQN's 64 -> 3136 tau embedding; the small ones (the Nature head's last layer, CartPole's MLPs)
gain nothing worth a custom operator's call."""


@torch.library.custom_op("dqn_atari::linear", mutates_args=())
def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D float32 CPU tensors, by oneDNN (any strides). Opaque to torch.compile."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_product.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@_product.register_vmap
def _per_run(info, in_dims, x, weight, bias):
    """vmap (K runs batched): the product of each slice, one after the other, exactly as each run alone gets it."""

    def part(t, dim, k):
        return t if t is None or dim is None else t.select(dim, k)

    outs = [_product(*(part(t, d, k) for t, d in zip((x, weight, bias), in_dims))) for k in range(info.batch_size)]
    return torch.stack(outs), 0


class _OneDNNLinear(torch.autograd.Function):
    """The product with its gradients, which are two more such products; vmap and grad transforms (K runs in one
    process) go through the operator's own vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _product(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    @once_differentiable  # no second derivatives (nothing here takes them): a clear error if one is asked for
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _product(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # grad @ weight
        grad_weight = _product(grad.t(), x.t(), None) if ctx.needs_input_grad[1] else None  # grad.T @ x
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


@register_flop_formula(torch.ops.dqn_atari.linear)
def _flops(x_shape, w_shape, *args, **kwargs) -> int:
    """For torch's FLOP counter (scripts/bench_train.py): a matrix product's 2 * M * K * N."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


@functools.cache
def usable() -> bool:
    """Whether oneDNN's product is there and agrees with ``F.linear`` (forward and both gradients, to float32
    rounding) on a small case; checked once per process, without drawing from torch's random streams."""
    try:
        with torch.enable_grad():  # whatever the caller's grad mode
            x = torch.linspace(-1.0, 1.0, 5 * 7).reshape(5, 7).requires_grad_()
            w = torch.linspace(0.5, -0.7, 3 * 7).reshape(3, 7).requires_grad_()
            b = torch.linspace(0.1, 0.3, 3).requires_grad_()
            grad = torch.linspace(-0.2, 0.9, 5 * 3).reshape(5, 3)
            ours = (_OneDNNLinear.apply(x, w, b), *torch.autograd.grad(_OneDNNLinear.apply(x, w, b), (x, w, b), grad))
            plain = (F.linear(x, w, b), *torch.autograd.grad(F.linear(x, w, b), (x, w, b), grad))
        same = all(torch.allclose(a, p, rtol=1e-5, atol=1e-6) for a, p in zip(ours, plain))
    except Exception as error:  # no oneDNN in this torch build, or an operator that changed
        warnings.warn(f"dqn_atari.cpu_linear: oneDNN's linear is not usable here ({type(error).__name__}: {error}); "
                      f"linear layers use F.linear (same results, slower on some CPUs).")
        return False
    if not same:
        warnings.warn("dqn_atari.cpu_linear: oneDNN's linear disagrees with F.linear here; linear layers use F.linear.")
    return same


def worth_it(in_features: int, out_features: int) -> bool:
    """Whether a layer of this size takes oneDNN's product on CPU (see :data:`MIN_WEIGHTS`)."""
    return in_features * out_features >= MIN_WEIGHTS and usable()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; by oneDNN where ``onednn`` (the layer's :func:`worth_it`) and ``x`` is a
    float32 CPU tensor of 2 or more dimensions (the leading ones are flattened into rows, as ``F.linear`` does)."""
    if onednn and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2:
        rows = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return rows if x.dim() == 2 else rows.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
