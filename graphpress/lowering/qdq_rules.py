"""The onnx-qdq target: standard ONNX only (no contrib-op domain), for deployment compilers that read
quantized models as DequantizeLinear / QuantizeLinear around float ops (OpenVINO, TensorRT, QNN...).

    graphpress::quantized_linear(x, codes, scales, zeros, bias, K, bits, g)
        -> MatMul(x, DequantizeLinear(W [K, N], scale, zero)) (+ bias)          opset 21 DequantizeLinear
           groups of g columns: blocked along K (axis 0, block_size g, scale and zero [K/g, N]), K padded
           to whole blocks (zero codes, x padded with zeros: OpenVINO refuses a partial last block);
           one group per row: per output channel (axis 1, scale and zero [N])
           W stores the codes: asymmetric as unsigned with their zero points, symmetric as signed without;
           4-bit ones as INT4 / UINT4 initializers (``narrow_initializers``: two codes a byte in the file)
    graphpress::quantized_linear(..., activation_bits=8)
        -> x rounded per token first: r * DequantizeLinear(QuantizeLinear(x / r, 1/127), 1/127), r = max|x_row|,
           a Q/DQ pair with a constant scale that a compiler turns into an int8 product
    graphpress::quantized_embedding(codes, scales, zeros, ids, bits, g, H)
        -> Gather(DequantizeLinear(W [V, H], scale, zero), ids)   per row (axis 0) or blocked along H (axis 1)
    a head tied to the embedding: MatMul(x, Transpose(DequantizeLinear(W, scale [V], zero [V], axis 0))),
        the same DequantizeLinear of the table's own initializer (stored once; 8-bit tables: 4-bit is refused)
    graphpress::rotary_embedding -> RotaryEmbedding (opset 23)
    graphpress::cached_attention -> RotaryEmbedding, Concat with the past, Attention (opset 23)

Option ``opset`` (21, 22 or 23, default 23): the file's ONNX opset. Below 23 nothing of opset 23 is written:
the rotary goes through its decomposition and the exporter writes attention and RMS norm as the older ops.

Weight-only products are exact up to float rounding in a runtime that dequantizes; onnxruntime fuses
DequantizeLinear -> MatMul into MatMulNBits with int8 activations per block by default, so the export check
(run there) holds every linear to the int8 floor, against the program rounding x per token where the op does.
"""

from __future__ import annotations

import ml_dtypes
import onnx_ir
import torch

import graphpress.kernels.quantized  # noqa: F401  (defines torch.ops.graphpress.quantized_*)
from graphpress.kernels.attention import cached_attention_with
from graphpress.kernels.quantized import dequantize, unpack_uint8
from graphpress.lowering.onnxruntime_rules import EMBEDDING, INT8_ACTIVATIONS_DB, LINEAR, rotary_rule
from graphpress.lowering.rules import Rule, RuleTable, TargetError
from graphpress.quant.int8 import TINY, fake_quantize_rows


def _dq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, axis: int, block: int = 0,
        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ONNX DequantizeLinear (opset 21): per-axis (block 0) or blocked along ``axis``."""
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    inputs = [codes, scale] + ([zero] if zero is not None else [])
    return torch.onnx.ops.symbolic("DequantizeLinear", inputs, attrs=attrs, dtype=dtype, shape=codes.shape,
                                   version=21)


def _rows_qdq(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded to int8 per row (symmetric, step max|row| / 127): each row divided by its max, then a
    QuantizeLinear / DequantizeLinear pair with the constant step 1/127, then multiplied back. A per-tensor
    pair with a constant scale is the form every compiler reads on a dynamic input (OpenVINO refuses blocked
    DequantizeLinear on one), and per row costs no more than per tensor."""
    rows = x.abs().amax(-1, keepdim=True).clamp(min=TINY)  # [..., 1]
    step, zero = torch.tensor(1 / 127, dtype=x.dtype), torch.tensor(0, dtype=torch.int8)
    q = torch.onnx.ops.symbolic("QuantizeLinear", [x / rows, step, zero], dtype=torch.int8, shape=x.shape,
                                version=21)
    return _dq(q, step, zero, 1, dtype=x.dtype) * rows


def _zero_points(zeros: torch.Tensor | None, bits: int, rows: int, groups: int) -> torch.Tensor:
    """Each group's zero point, uint8 [rows, groups] (2^(bits-1) for symmetric codes)."""
    if zeros is None:
        return torch.full((rows, groups), 1 << (bits - 1), dtype=torch.uint8)
    return unpack_uint8(zeros, bits, groups).contiguous()


def _linear_store(x, qweight, scales, zeros, bias, in_features, bits, group_size, activation_bits=0, *,  # noqa: ANN001, ANN202, E501
                  shared=frozenset()):
    """The weight as codes [K, N] (signed without zero points when symmetric) with scales and zero points laid
    out for DequantizeLinear; a tied head keeps the table's codes [V, H]."""
    n, groups = scales.shape
    if 1 in shared:
        if bits != 8 or groups != 1:
            raise TargetError(f"onnx-qdq reads a head tied to its embedding from the table's own codes, which "
                              f"it can only do for 8 bits with one group per row (this one: {bits} bits, "
                              f"{groups} groups): quantize the embedding with bits 8, group_size null")
        codes = qweight if qweight.shape[1] == in_features else qweight[:, :in_features]
        return (x, "tied", codes, scales[:, 0].contiguous(), _zero_points(zeros, bits, n, 1)[:, 0], bias,
                activation_bits, 0)
    codes = unpack_uint8(qweight, bits, groups * group_size)[:, :in_features]  # [N, K] uint8
    zp = None
    if zeros is None:  # symmetric: the codes centred on 2^(bits-1) become signed ones, zero point 0
        codes = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    else:
        zp = unpack_uint8(zeros, bits, groups)  # [N, G]
    if groups == 1:
        return (x, "axis", codes.T.contiguous(), scales[:, 0].contiguous(), None if zp is None else zp[:, 0].contiguous(),
                bias, activation_bits, 0)
    # K padded to whole blocks with zero codes (OpenVINO refuses a partial last block); x is padded to match
    codes = torch.nn.functional.pad(codes, (0, groups * group_size - in_features))
    return (x, "blocked", codes.T.contiguous(), scales.T.contiguous(), None if zp is None else zp.T.contiguous(),
            bias, activation_bits, group_size)


def _linear_lower(x, layout, codes, scale, zero, bias, activation_bits, block):  # noqa: ANN001, ANN202
    if activation_bits == 8:
        x = _rows_qdq(x)
    if layout == "tied":
        y = torch.matmul(x, _dq(codes, scale, zero, 0, dtype=x.dtype).T)
    else:
        if codes.shape[0] > x.shape[-1]:  # whole blocks: x's extra columns are zeros
            x = torch.nn.functional.pad(x, (0, codes.shape[0] - x.shape[-1]))
        y = torch.matmul(x, _dq(codes, scale, zero, 0 if layout == "blocked" else 1, block, x.dtype))
    return y + bias if bias is not None else y


def _linear_emulation(x, qweight, scales, zeros, bias, in_features, bits, group_size, activation_bits=0):  # noqa: ANN001, ANN202, E501
    """The weight exactly; x rounded per token where the op multiplies int8 activations."""
    if activation_bits == 8:
        x = fake_quantize_rows(x)
    w = dequantize(qweight, scales, zeros, in_features, bits, group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def _embedding_store(qweight, scales, zeros, indices, bits, group_size, hidden, *, shared=frozenset()):  # noqa: ANN001, ANN202
    """One code a byte [V, H] (a table shared with a head: its own 8-bit codes), zero points [V, G]."""
    v, groups = scales.shape
    if 0 in shared and bits != 8:
        raise TargetError(f"onnx-qdq cannot share a {bits}-bit table between the embedding and the head: "
                          "quantize the embedding with bits 8")
    codes = qweight if 0 in shared else unpack_uint8(qweight, bits, groups * group_size)[:, :hidden].contiguous()
    return (codes, scales, _zero_points(zeros, bits, v, groups), indices, hidden,
            group_size if groups > 1 else hidden)


def _embedding_lower(codes, scales, zp, indices, hidden, block):  # noqa: ANN001, ANN202
    """Gather from the dequantized table: DequantizeLinear on a constant, the form compilers keep compressed
    (OpenVINO refuses a blocked one on the gathered, dynamic rows)."""
    if codes.shape[1] != hidden:  # a shared 8-bit table padded past H
        codes = codes[:, :hidden]
    table = _dq(codes, scales[:, 0], zp[:, 0], 0, dtype=scales.dtype) if scales.shape[1] == 1 else \
        _dq(codes, scales, zp, 1, block, scales.dtype)
    return torch.nn.functional.embedding(indices, table)


def narrow_initializers(model: onnx_ir.Model) -> None:
    """Store 8-bit initializers read by DequantizeLinear (its codes and zero point) as 4-bit ones where
    every value fits: the same numbers, two a byte in the file (INT4 / UINT4, opset 21)."""
    narrower = {onnx_ir.DataType.UINT8: (onnx_ir.DataType.UINT4, ml_dtypes.uint4, 0, 15),
                onnx_ir.DataType.INT8: (onnx_ir.DataType.INT4, ml_dtypes.int4, -8, 7)}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        values = [v for i, v in enumerate(node.inputs) if i != 1 and v is not None]
        if not values or any(v.const_value is None or v.dtype not in narrower
                             or any(u.op_type != "DequantizeLinear" for u, _ in v.uses()) for v in values):
            continue  # not constants, or read by another op too (a table that Gather reads as well)
        arrays = [v.const_value.numpy() for v in values]
        if not all(narrower[v.dtype][2] <= a.min() and a.max() <= narrower[v.dtype][3]
                   for v, a in zip(values, arrays, strict=True) if a.size):
            continue
        for v, a in zip(values, arrays, strict=True):
            dtype, np_type = narrower[v.dtype][:2]
            v.const_value = onnx_ir.Tensor(a.astype(np_type), dtype=dtype, name=v.name)
            v.dtype = dtype


OPSETS = (21, 22, 23)  # blocked DequantizeLinear needs 21


def _cached_attention_lower(*args):  # noqa: ANN002, ANN202
    """graphpress::cached_attention as its reference with the rotary as ONNX RotaryEmbedding: the heads' Reshape
    and Transpose, the Concat with the past and one Attention (opset 23)."""
    return cached_attention_with(rotary_rule, *args)


def qdq_rules(opset: int = 23) -> RuleTable:
    """The onnx-qdq target's rules (see the module docstring). ``opset``: 23 keeps RMSNormalization, Attention
    and RotaryEmbedding as single ops; 21 or 22 writes them as the older standard ops they decompose into
    (MatMul, Softmax, ReduceMean, Sin/Cos...) for compilers that do not read opset 23 or run it badly."""
    if isinstance(opset, bool) or opset not in OPSETS:
        raise TargetError(f"onnx-qdq option opset must be one of {', '.join(map(str, OPSETS))}, not {opset!r}")
    rules = [
        # onnxruntime (where the export check runs) fuses DequantizeLinear -> MatMul into its MatMulNBits and by
        # default (session.qdq_matmulnbits_accuracy_level 4) rounds the activations to int8 per block there:
        # a 4-bit tiny llama measured 44.5 dB against the exact product; a wrong layout lands near 0 dB
        Rule(LINEAR, _linear_lower, target="onnx", check_sqnr_db=INT8_ACTIVATIONS_DB, emulate=_linear_emulation,
             store=_linear_store),
        Rule(EMBEDDING, _embedding_lower, target="onnx", store=_embedding_store),
    ]
    if opset >= 23:  # below, the rotary goes through its decomposition (its reference: x cos + rotate(x) sin)
        rules.append(Rule(torch.ops.graphpress.rotary_embedding.default, rotary_rule, target="onnx"))
        rules.append(Rule(torch.ops.graphpress.cached_attention.default, _cached_attention_lower, target="onnx"))
    return RuleTable(tuple(rules), finish=narrow_initializers, opset=opset)
