"""The CUDA implementations of graphpress's ops: Triton kernels where one covers the call, the PyTorch
reference otherwise, so a program moved to the GPU (``program.to("cuda")``) runs unchanged, under
``torch.compile`` and CUDA graphs too (each kernel tunes a shape on its first call: run it once before
capturing a graph).

    graphpress::quantized_linear, 4-bit weights, bf16/fp16 activations, groups of a multiple of 64
        -> graphpress.kernels.triton_w4a16

Registered when Triton is installed (it comes with PyTorch's CUDA wheels); without it the references run.
"""

from __future__ import annotations

import importlib.util

import torch

from graphpress.kernels.quantized import quantized_linear, quantized_linear_reference

AVAILABLE = importlib.util.find_spec("triton") is not None


def _quantized_linear_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, bits: int,
                           group_size: int, activation_bits: int = 0) -> torch.Tensor:
    from graphpress.kernels import triton_w4a16

    if triton_w4a16.supports(x, bits, group_size, activation_bits):
        return triton_w4a16.w4a16_linear(x, qweight, scales, zeros, bias, in_features, group_size)
    return quantized_linear_reference(x, qweight, scales, zeros, bias, in_features, bits, group_size,
                                      activation_bits)


if AVAILABLE:
    quantized_linear.register_kernel("cuda")(_quantized_linear_cuda)
