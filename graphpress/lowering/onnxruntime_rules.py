"""Lowering rules to onnxruntime contrib ops (domain ``com.microsoft``).

    graphpress::matmul_nbits(x, B, scales, zeros, bias, K, N, bits, block_size, accuracy_level)
        -> com.microsoft::MatMulNBits(x, B, scales, zero_points, g_idx="", bias)  {K, N, bits, block_size,
           accuracy_level}
    graphpress::gather_nbits(B, scales, zeros, indices, bits, block_size, H)
        -> com.microsoft::GatherBlockQuantized(Reshape(B, [V, H * bits / 8]), indices, scales, zero_points)
           {bits, block_size, gather_axis=0, quantize_axis=1}
       (B is MatMulNBits' layout; with block_size dividing H the reshape is free and the one stored B also
       feeds a tied MatMulNBits. The exporter's constant folding copies B only when it is <= 8192 bytes.)
    graphpress::matmul_w8a8(x, Q [K, N] int8, w_s, bias)
        -> x_s = ReduceMax(Abs(x), -1) / 127;  MatMulInteger(Cast<uint8>(Round(x / x_s) + 128), Q, 128)
           -> Cast<float> * x_s * w_s (+ bias)          (standard ONNX; see _matmul_w8a8_rule for why)

``accuracy_level`` is the minimum precision onnxruntime may compute in: 0 = unset, 1 = fp32, 2 = fp16,
3 = bf16, 4 = int8 (activations quantized per block on the fly: fastest on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import graphpress.kernels.gather_nbits  # noqa: F401  (defines torch.ops.graphpress.gather_nbits)
import graphpress.kernels.matmul_nbits  # noqa: F401  (defines torch.ops.graphpress.matmul_nbits)
import graphpress.kernels.matmul_w8a8  # noqa: F401  (defines torch.ops.graphpress.matmul_w8a8)
from graphpress.lowering.rules import Rule, RuleTable

MS = "com.microsoft"


def _matmul_nbits_rule(override: int | None) -> Callable[..., torch.Tensor]:
    def lower(x, qweight, scales, zeros, bias, K, N, bits, block_size, accuracy_level=0):  # noqa: ANN001, ANN202
        accuracy_level = accuracy_level if override is None else override
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


def _matmul_w8a8_rule(x, qweight, scales, bias):  # noqa: ANN001, ANN202
    """Per-token int8 activations by standard ops, then one u8 x s8 MatMulInteger; the reference computes the same.

    Measured here (AMD EPYC, 2 cores with AVX-512 VNNI shared with other jobs, onnxruntime 1.32;
    ``tools/bench_w8a8.py``), x [1, 128, K] @ W^T, ms with 1 thread (the minimum over 30 rounds; 2 threads gave
    the same order, with far more noise), and SQNR against the float product on rows of varied range
    without / with one x20 outlier channel:

        K x N         fp32 MatMul   (a) MatMulNBits 8b acc4    (b) DQLinear+MatMulInteger   this rule
                                      bs 64 / 128 / 256         (c) DynamicQuantizeMatMul   (per token)
        576 x 1536       0.99        0.72 / 0.80 / 0.80          0.29 / 0.29                  0.37
        1536 x 576       0.98        0.70 / 0.64 / 0.56          0.29 / 0.29                  0.42
        576 x 49152     37.6         24.4 / 26.3 / 26.5          11.8 / 11.9                  15.8
        SQNR dB          131         40 / 40 / 40                36                           39
          outlier        131         37 / 35 / 32                18-19                        28-29

    (a) quantizes x per row and block of K, finer than per token and the most accurate, but is 1.3-2x slower
    than this rule. (b) and (c), the fastest, quantize x per tensor (uint8 asymmetric): one loud channel or
    token costs every row, and on SmolLM2-135M after SmoothQuant the perplexity is 16.93 against 15.07 with
    per-token scales (fp32 14.94; torch programs, the same weights). So: per-token scales from
    Abs / ReduceMax / Div / Round, then (b)'s integer matmul, 1.3-1.45x (b)'s time. Codes go in as uint8 q + 128
    with zero point 128 so that MLAS takes its u8 x s8 kernel (int8 x int8 MatMulInteger measured 10-30x
    slower). Caveat: without VNNI, MLAS's u8 x s8 kernel on AVX2 can saturate int16 pair sums (onnxruntime's
    documented reduce_range issue), where onnxruntime would drift from the reference.
    """
    x_s = x.abs().amax(-1, keepdim=True) / 127  # [..., 1]
    x_s = torch.where(x_s > 0, x_s, torch.ones_like(x_s))  # an all-zero row: any scale is exact
    x_u8 = (torch.round(x / x_s) + 128).to(torch.uint8)  # [..., K] codes q + 128, q in [-127, 127]
    zero = torch.tensor(128, dtype=torch.uint8)
    acc = torch.onnx.ops.symbolic(
        "MatMulInteger", [x_u8, qweight, zero], dtype=torch.int32, shape=[*x.shape[:-1], qweight.shape[1]], version=10
    )  # [..., N] int32, exact
    y = acc.to(x.dtype) * x_s * scales
    return y + bias if bias is not None else y


# export-check floors (SQNR of the whole model's output, onnxruntime against the torch program). With int8
# activations (accuracy level 4, matmul_w8a8) the reference emulates the rounding, but one tie that falls the
# other way in float changes a code and the difference spreads through attention: a 4-bit SmolLM2 measured
# 28 dB, W8A8 31 dB, a tiny llama 60 dB. A wrong layout measures near 0 dB. Programs with no lowered op are
# held to 60 dB by export_onnx whatever the table says.
CHECK_SQNR_DB = {0: 60.0, 1: 60.0, 2: 40.0, 3: 30.0, 4: 20.0}


def onnxruntime_rules(accuracy_level: int | None = None) -> RuleTable:
    """The rules; ``accuracy_level`` forces MatMulNBits' compute precision for every node instead of the one
    each node carries (which its torch reference emulates, so only an override loosens the export check)."""
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, not {accuracy_level}")
    return RuleTable((
        Rule(torch.ops.graphpress.matmul_nbits.default, _matmul_nbits_rule(accuracy_level)),
        Rule(torch.ops.graphpress.gather_nbits.default, _gather_nbits_rule),
        Rule(torch.ops.graphpress.matmul_w8a8.default, _matmul_w8a8_rule),
    ), check_sqnr_db=CHECK_SQNR_DB[accuracy_level] if accuracy_level is not None else 20.0)
