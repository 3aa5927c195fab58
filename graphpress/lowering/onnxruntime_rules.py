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
        -> r = ReduceMax(Abs(x), -1);  com.microsoft::DynamicQuantizeMatMul(x / r, Q, w_s) * r (+ bias)
           (per-token int8 activations through onnxruntime's fused per-tensor op; see _matmul_w8a8_rule)
    graphpress::rotary_embedding(x [B, H, S, D], cos, sin [B|1, 1, S, D])
        -> RotaryEmbedding(x, cos[:, 0, :, :D/2], sin[:, 0, :, :D/2])   (ONNX opset 23)
    graphpress::matmul_nbits(..., kernel="int8")
        -> Q, w_s = int8 per-channel requantization of the dequantized weight, written as ops on the
           initializers (onnxruntime folds them at session start), then the matmul_w8a8 lowering

``accuracy_level`` is the minimum precision onnxruntime may compute in: 0 = unset, 1 = fp32, 2 = fp16,
3 = bf16, 4 = int8 (activations quantized per block on the fly: fastest on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import graphpress.kernels.gather_nbits  # noqa: F401  (defines torch.ops.graphpress.gather_nbits)
import graphpress.kernels.matmul_nbits  # noqa: F401  (defines torch.ops.graphpress.matmul_nbits)
import graphpress.kernels.matmul_w8a8  # noqa: F401  (defines torch.ops.graphpress.matmul_w8a8)
import graphpress.kernels.rotary  # noqa: F401  (defines torch.ops.graphpress.rotary_embedding)
from graphpress.kernels.matmul_nbits import dequantize_nbits
from graphpress.lowering.rules import Rule, RuleTable
from graphpress.quant.int8 import TINY, symmetric_int8_rows

MS = "com.microsoft"


def _matmul_nbits_rule(override: int | None) -> Callable[..., torch.Tensor]:
    def lower(x, qweight, scales, zeros, bias, K, N, bits, block_size, accuracy_level=0, kernel="nbits"):  # noqa: ANN001, ANN202, E501
        if kernel == "int8":
            # the float weight and its int8 requantization are computed from initializers only, so onnxruntime
            # folds them into one int8 [K, N] initializer at session start; the file keeps the packed codes
            w = dequantize_nbits(qweight, scales, zeros, K, bits, block_size)  # [N, K]
            q, s = symmetric_int8_rows(w)
            return _matmul_w8a8_rule(x, q.T, s, bias)
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


def _rotary_rule(x, cos, sin):  # noqa: ANN001, ANN202
    """ONNX RotaryEmbedding (opset 23) reads cos/sin as [B, S, D/2]: fuse_rotary checked that the halves repeat."""
    half = x.shape[-1] // 2
    cos, sin = (t[:, 0, :, :half].expand(x.shape[0], -1, -1) for t in (cos, sin))
    return torch.onnx.ops.rotary_embedding(x, cos, sin)


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
    """Each token scaled to absmax 1, then onnxruntime's fused DynamicQuantizeMatMul, then scaled back.

    Measured here (AMD EPYC, 2 cores with AVX-512 VNNI, onnxruntime 1.32), single-op sessions, x [1, 128, K] @ W^T,
    ms, 2 threads, median of 30-50 runs (``tools/bench_w8a8.py`` compares the same options, interleaved):

        K x N         fp32 MatMul   MatMulNBits 8b acc4   DynamicQuantizeMatMul   this rule
                                    (block 128)           (per-tensor x)
        576 x 3072       1.04         0.88                  0.31                   0.35
        1536 x 576       0.52         0.37                  0.16                   0.21
        576 x 49152     19.9         13.7                   6.2                     -

    The previous lowering, per-token codes by standard ops (Abs, ReduceMax, Div, Round, Add, Cast) into
    MatMulInteger, measured 1.3-1.45x DynamicQuantizeMatMul's time per op and cost more than the integer
    matmuls in the whole model (profile in BENCHMARKS.md).

    DynamicQuantizeMatMul alone quantizes x per tensor (uint8 asymmetric): one loud token costs every row,
    and on SmolLM2-135M after SmoothQuant the perplexity is 16.93 against 15.07 with per-token scales (fp32
    14.94). Dividing each row by its absmax first (Abs, ReduceMax, Div; Mul after) makes that one scale a
    per-token one for 3 small elementwise ops. MLAS takes its u8 x s8 kernel for the int8 B. Caveat: without
    VNNI, MLAS's u8 x s8 kernel on AVX2 can saturate int16 pair sums (onnxruntime's documented reduce_range
    issue), where onnxruntime would drift from the reference.
    """
    rows = x.abs().amax(-1, keepdim=True).clamp(min=TINY)  # [..., 1]
    y = torch.onnx.ops.symbolic(
        f"{MS}::DynamicQuantizeMatMul", [x / rows, qweight, scales], dtype=x.dtype,
        shape=[*x.shape[:-1], qweight.shape[1]], version=1,
    ) * rows
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
        Rule(torch.ops.graphpress.rotary_embedding.default, _rotary_rule, target="onnx"),
    ), check_sqnr_db=CHECK_SQNR_DB[accuracy_level] if accuracy_level is not None else 20.0)
