"""The CUDA implementations of graphpress's ops: Triton kernels where one covers the call, the PyTorch
reference otherwise, so a program moved to the GPU (``program.to("cuda")``) runs unchanged, under
``torch.compile`` and CUDA graphs too (each kernel tunes a shape and lays out a weight on its first call: run
the program once before capturing a graph).

    graphpress::quantized_linear, 4-bit weights, groups of 64, 128 or 256, bf16/fp16/fp32 activations
        -> graphpress.kernels.triton_w4a16
    graphpress::quantized_linear, activation_bits=8 (W8A8), any weights -> graphpress.kernels.triton_w8a8

Registered when Triton is installed (it comes with PyTorch's CUDA wheels); without it the references run.
``CALLS`` counts the calls each implementation ran (kernel name or "reference").
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import torch

from graphpress.kernels.quantized import quantized_linear, quantized_linear_reference

AVAILABLE = importlib.util.find_spec("triton") is not None
CALLS: Counter[str] = Counter()


def _quantized_linear_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, bits: int,
                           group_size: int, activation_bits: int = 0) -> torch.Tensor:
    from graphpress.kernels import triton_w4a16, triton_w8a8

    if triton_w8a8.supports(x, activation_bits):
        CALLS["w8a8"] += 1
        return triton_w8a8.w8a8_linear(x, qweight, scales, zeros, bias, in_features, bits, group_size)
    if triton_w4a16.supports(x, bits, group_size, activation_bits):
        CALLS["w4a16"] += 1
        return triton_w4a16.w4a16_linear(x, qweight, scales, zeros, bias, in_features, group_size)
    CALLS["reference"] += 1
    return quantized_linear_reference(x, qweight, scales, zeros, bias, in_features, bits, group_size,
                                      activation_bits)


if AVAILABLE:
    quantized_linear.register_kernel("cuda")(_quantized_linear_cuda)
