"""Lowering rules to onnxruntime contrib ops (domain ``com.microsoft``).

    graphpress::matmul_nbits(x, B, scales, zeros, bias, K, N, bits, block_size)
        -> com.microsoft::MatMulNBits(x, B, scales, zero_points, g_idx="", bias)  {K, N, bits, block_size,
           accuracy_level}
    graphpress::gather_nbits(B, scales, zeros, indices, bits, block_size, H)
        -> com.microsoft::GatherBlockQuantized(Reshape(B, [V, H * bits / 8]), indices, scales, zero_points)
           {bits, block_size, gather_axis=0, quantize_axis=1}
       (B is MatMulNBits' layout; with block_size dividing H the reshape is free and the one stored B also
       feeds a tied MatMulNBits. The exporter's constant folding copies B only when it is <= 8192 bytes.)

``accuracy_level`` is the minimum precision onnxruntime may compute in: 0 = unset, 1 = fp32, 2 = fp16,
3 = bf16, 4 = int8 (activations quantized per block on the fly: fastest on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import graphpress.kernels.gather_nbits  # noqa: F401  (defines torch.ops.graphpress.gather_nbits)
import graphpress.kernels.matmul_nbits  # noqa: F401  (defines torch.ops.graphpress.matmul_nbits)
from graphpress.lowering.rules import Rule, RuleTable

MS = "com.microsoft"


def _matmul_nbits_rule(accuracy_level: int) -> Callable[..., torch.Tensor]:
    def lower(x, qweight, scales, zeros, bias, K, N, bits, block_size):  # noqa: ANN001, ANN202
        inputs = [x, qweight, scales, None if zeros is None else zeros]
        if bias is not None:
            inputs += [None, bias]  # g_idx (unused) sits between zero_points and bias
        while inputs[-1] is None:
            inputs.pop()
        return torch.onnx.ops.symbolic(
            f"{MS}::MatMulNBits",
            inputs,
            attrs={"K": K, "N": N, "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level},
            dtype=x.dtype,
            shape=[*x.shape[:-1], N],
            version=1,
        )

    return lower


def _gather_nbits_rule(qweight, scales, zeros, indices, bits, block_size, hidden):  # noqa: ANN001, ANN202
    v = qweight.shape[0]
    data = qweight.reshape(v, hidden * bits // 8)  # [V, k_blocks, bs * bits / 8] -> [V, H * bits / 8], same bytes
    inputs = [data, indices, scales] + ([] if zeros is None else [zeros])
    return torch.onnx.ops.symbolic(
        f"{MS}::GatherBlockQuantized",
        inputs,
        attrs={"bits": bits, "block_size": block_size, "gather_axis": 0, "quantize_axis": 1},
        dtype=scales.dtype,
        shape=[*indices.shape, hidden],
        version=1,
    )


def onnxruntime_rules(accuracy_level: int = 4) -> RuleTable:
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, not {accuracy_level}")
    return RuleTable((
        Rule(torch.ops.graphpress.matmul_nbits.default, _matmul_nbits_rule(accuracy_level)),
        Rule(torch.ops.graphpress.gather_nbits.default, _gather_nbits_rule),
    ))
