"""A check the GPU kernel tests share: an op captured in a CUDA graph recomputes for new inputs on replay."""

from __future__ import annotations

import torch


def replays_like_eager(x: torch.Tensor, args: tuple) -> torch.Tensor:
    """Capture graphpress::quantized_linear(x, *args), give x new values, replay: the graph's output must equal
    an eager call's. Returns the captured output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.graphpress.quantized_linear(x, *args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, torch.ops.graphpress.quantized_linear(x, *args))
    return captured
