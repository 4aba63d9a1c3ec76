"""CUDA graphs for the learning update and for acting (config ``cuda_graph=true``, CUDA devices only).

On a GPU the Nature-CNN update is bound by launching its ~120 kernels from Python, not by the GPU: on one H200
it took 3.9 ms eagerly against 0.6 ms of GPU work, and the same update captured once in a CUDA graph replayed
in 0.62 ms (results/benchmarks/gpu/README.md). :class:`Graphed` wraps a function of tensors so that it runs as
such a graph: the same kernels on the same memory, so the same floats as calling it (up to the algorithms
cuDNN picks), without the Python. (Adam is built ``capturable`` under ``cuda_graph=true``: it then computes its
bias corrections on the device in float32, which changes its last bits against the plain Adam.)

How a call runs, per input signature (the shapes, dtypes and devices of the tensors passed in, and grad mode):

- the first :data:`WARMUP` calls run the function as it is (real calls: an update is a real update), on a
  side stream, as PyTorch asks before a capture (lazy initialisation, workspaces);
- the next call captures it in a graph, on copies of that call's inputs that become the graph's static inputs,
  and replays it;
- every call from then on copies its inputs into the static ones and replays the graph.

A capture that fails (an operation that cannot be captured, such as one that waits for the host) is reported
once as a warning, and that signature runs as it is from then on: slower, but the run goes on.

The outputs are cloned, since the next replay overwrites them. Python side effects of the function happen at
capture only, so it must be a pure function of tensors that it reads or updates in place (module parameters,
optimizer states, buffers): replacing such a tensor (``load_state_dict`` of an optimizer, re-stacking
parameters) requires :meth:`Graphed.reset`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map

WARMUP = 3
"""Calls of each input signature run as they are before the graph is captured."""
MAX_GRAPHS = 4
"""Input signatures given a graph; calls of any other signature run as they are."""


def cuda_capture(fn: Callable[..., Any], inputs: tuple) -> Callable[[], Any]:
    """Capture ``fn(*inputs)`` in a CUDA graph on the inputs' device; returns ``replay``, which runs it and returns
    its outputs (the same tensors every time). Capturing records the kernels without running them."""
    device = tree_flatten(inputs)[0][0].device
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream(device)
    # On that device's own stream: torch.cuda.graph's default capture stream belongs to the current device,
    # which need not be the run's (device=cuda:1).
    try:
        with torch.cuda.device(device), torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            outputs = fn(*inputs)
    except BaseException:
        # torch.cuda.graph ends the capture before it leaves its stream, so a capture that fails at its end would
        # leave the capture stream current for the rest of the process.
        torch.cuda.set_stream(current)
        raise

    def replay() -> Any:
        graph.replay()
        return outputs

    return replay


class Graphed:
    """``fn`` (tensors in, a tree of tensors out), run as a captured graph (module docstring). ``capture`` is
    :func:`cuda_capture`; tests of this wrapper's own bookkeeping on a CPU machine pass one that replays by
    calling ``fn`` again on the static inputs."""

    def __init__(self, fn: Callable[..., Any], capture: Callable = cuda_capture):
        self.fn, self.capture = fn, capture
        self.reset()

    def reset(self) -> None:
        """Forget every graph (after a tensor that ``fn`` uses was replaced): the next calls warm up anew."""
        self.graphs: dict[tuple, tuple[list[torch.Tensor], Callable[[], Any]]] = {}
        self.calls: dict[tuple, int] = {}
        self.failed: set[tuple] = set()  # signatures whose capture failed: they run as they are

    def __call__(self, *inputs: Any) -> Any:
        leaves = tree_flatten(inputs)[0]
        # Grad mode changes what fn records, so it is part of the signature.
        key = (torch.is_grad_enabled(), *((t.shape, t.dtype, t.device) for t in leaves))
        if key in self.graphs:
            static, replay = self.graphs[key]
            for s, t in zip(static, leaves):
                s.copy_(t, non_blocking=True)
        elif self.calls.get(key, 0) < WARMUP or len(self.graphs) >= MAX_GRAPHS or key in self.failed:
            self.calls[key] = self.calls.get(key, 0) + 1
            return self._warm(inputs, leaves)
        else:
            static_inputs = _clone(inputs)  # the graph's own input tensors, which this call's values fill
            try:
                replay = self.capture(self.fn, static_inputs)
            except Exception as err:  # recording runs nothing, so this call's work is still to be done
                self.failed.add(key)
                name = getattr(self.fn, "__qualname__", repr(self.fn))
                warnings.warn(f"CUDA graph capture of {name} failed, so it runs without a graph from now on "
                              f"(slower, same results): {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
                return self._warm(inputs, leaves)
            self.graphs[key] = (tree_flatten(static_inputs)[0], replay)
        return _clone(replay())

    def _warm(self, inputs: tuple, leaves: list[torch.Tensor]) -> Any:
        if not (leaves and leaves[0].is_cuda):
            return self.fn(*inputs)
        main = torch.cuda.current_stream(leaves[0].device)
        side = torch.cuda.Stream(leaves[0].device)
        side.wait_stream(main)
        # A capturable optimizer stepped outside a capture (as here, on purpose) would advise capturable=False.
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            outputs = self.fn(*inputs)
        main.wait_stream(side)
        return outputs


def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)
