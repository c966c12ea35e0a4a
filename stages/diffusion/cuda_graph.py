"""CUDA-graph replay of a tensor function, one captured graph per input shape.

A one-step turbo model at small batches is bound by kernel launches, not arithmetic:
the SD-Turbo UNet launches over a thousand kernels per call. A CUDA graph records
them once and replays them with one launch. A graph is fixed to the shapes, dtypes and
addresses it was captured with, so ``CudaGraphed`` keeps one graph per combination of
input shapes (in practice one per batch size) with its own static input buffers: each
call copies its inputs into them, replays, and returns the graph's output buffer.

That output buffer is overwritten by the next replay of any graph (they share one
memory pool): a caller must consume or copy it before the next call, which the
real-time loop does (the scheduler's step makes a new tensor from it).

Capturing runs the function a few times on a side stream first (cuDNN and cuBLAS pick
their algorithms and allocate workspaces outside the graph), so the first frame of each
new batch size costs a few calls' time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP_CALLS = 3
"""Eager calls before a capture, on a side stream, as PyTorch's CUDA-graph notes advise."""


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor | None, ...]
    output: torch.Tensor


class CudaGraphed:
    """``fn(*tensors)`` replayed from a CUDA graph per input signature. Arguments may be
    None (passed through as a constant); everything else must be a CUDA tensor."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        key = tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args)
        for buffer, value in zip(entry.inputs, args):
            if buffer is not None:
                buffer.copy_(value)
        entry.graph.replay()
        return entry.output

    @property
    def captured(self) -> int:
        """How many graphs (input signatures) have been captured."""
        return len(self._graphs)

    def _capture(self, args: tuple[torch.Tensor | None, ...]) -> _Graph:
        inputs = tuple(None if a is None else a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.fn(*inputs)
        self._pool = graph.pool()
        return _Graph(graph=graph, inputs=inputs, output=output)
