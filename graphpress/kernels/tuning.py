"""Choosing a kernel configuration per shape by timing the candidates the way a model runs them.

A layer's weights are read from memory, not from the L2 cache, when the whole model runs: each candidate is
timed by CUDA-graph replay (launch overhead excluded) of calls cycling through copies of the weights that
overflow the L2 (``L2_OVERFLOW`` bytes: 4x an H100/H200's 60 MB). The choice is kept per key for the process:
run a shape once before capturing a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

L2_OVERFLOW = 240_000_000


def bucket(m: int) -> int:
    """M rounded up to a power of two: the shapes one tuned configuration serves."""
    return 1 << max(0, (m - 1).bit_length())


def graph_us(fn: Callable[[int], Any], calls: int, replays: int = 5) -> float:
    """Microseconds per call of ``fn(i)`` for i < calls, captured in one CUDA graph and replayed."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def copies(weights: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """The weights and enough clones of them to overflow the L2 (at most 64 sets)."""
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    n = max(1, min(64, -(-L2_OVERFLOW // max(nbytes, 1))))
    return [tuple(weights)] + [tuple(t.clone() for t in weights) for _ in range(n - 1)]


class Tuner:
    """``choose(key, candidates, run, weights)``: the fastest candidate for ``key``, timed on first use;
    ``run(config, weights)`` launches one call with a set of weights (tuples like ``weights``). Candidates that
    exceed the GPU's resources are skipped."""

    def __init__(self) -> None:
        self.chosen: dict[Hashable, Any] = {}

    def choose(self, key: Hashable, candidates: Sequence[Any], run: Callable[[Any, tuple[torch.Tensor, ...]], Any],
               weights: Sequence[torch.Tensor]) -> Any:
        if key not in self.chosen:
            import triton

            sets = copies(weights)
            times = {}
            for c in candidates:
                try:
                    times[c] = graph_us(lambda i, c=c: run(c, sets[i]), len(sets))
                except triton.runtime.errors.OutOfResources:
                    continue
            if not times:
                raise RuntimeError(f"no kernel configuration fits this GPU for {key}")
            self.chosen[key] = min(times, key=times.get)
        return self.chosen[key]
