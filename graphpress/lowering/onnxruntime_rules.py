"""The onnxruntime target: lowering rules to onnxruntime contrib ops (domain ``com.microsoft``), with options.

    graphpress::quantized_linear(x, codes, scales, zeros, bias, K, bits, g)
        kernel "nbits"  -> com.microsoft::MatMulNBits(x, codes as [N, K / block, block * bits / 8], scales,
                           zero_points, g_idx="", bias) {K, N, bits, block_size, accuracy_level}
        kernel "int8"   -> the weight requantized to int8 per channel: the file keeps the codes (regrouped,
                           ``int8_storage``) with each group's step, and ops on them that onnxruntime folds into
                           one int8 [K, N] initializer at session start; then the W8A8 product below
    graphpress::quantized_linear(..., activation_bits=8)
        -> r = ReduceMax(Abs(x), -1);  com.microsoft::DynamicQuantizeMatMul(x / r, Q [K, N] int8, w_s) * r (+ bias)
    graphpress::quantized_embedding(codes, scales, zeros, indices, bits, g, H)
        -> com.microsoft::GatherBlockQuantized(codes as [V, H * bits / 8], indices, scales, zero_points)
           {bits, block_size, gather_axis=0, quantize_axis=1}; a tied head reads the very same initializer
    graphpress::rotary_embedding(x [B, H, S, D], cos, sin [B|1, 1, S, D])
        -> RotaryEmbedding(x, cos[:, 0, :, :D/2], sin[:, 0, :, :D/2])   (ONNX opset 23)

The program's groups become onnxruntime's blocks: a group of a power of two >= 16 is one block; one group per
row (any K) becomes blocks of the largest such power dividing K (else 64, the last one partial), its scale
repeated; other groups are refused with what works instead (the int8 kernel takes any).

Options (``onnxruntime_rules(**options)``, a recipe's ``target: {onnxruntime: {...}}`` or the CLI's
``--target-option``): ``kernel`` (above), ``accuracy_level`` (MatMulNBits' minimum compute precision: 0 unset,
1 fp32, 2 fp16, 3 bf16, 4 int8 activations per block, fastest on CPU), ``fp16_scales`` (scales rounded to
float16 values, so that the file stores them in half the bytes; they move weights by at most 2^-11 of their
value). Each rule states the export check's floor for what it emitted (``Rule.check_sqnr_db``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import graphpress.kernels.attention  # noqa: F401  (defines torch.ops.graphpress.cached_attention)
import graphpress.kernels.quantized  # noqa: F401  (defines torch.ops.graphpress.quantized_*)
import graphpress.kernels.rotary  # noqa: F401  (defines torch.ops.graphpress.rotary_embedding)
from graphpress.graph import get_tensor, set_tensor
from graphpress.kernels.attention import unpack
from graphpress.kernels.quantized import (
    dequantize,
    grouped_codes,
    quantized_embedding_reference,
    row_requantization,
    unpack_codes,
    w8a8_product,
)
from graphpress.lowering.rotary_tables import computed_rotary_tables
from graphpress.lowering.rules import EXACT_DB, Rule, RuleTable, TargetError, chain
from graphpress.quant.int8 import TINY

MS = "com.microsoft"
LINEAR = torch.ops.graphpress.quantized_linear.default
EMBEDDING = torch.ops.graphpress.quantized_embedding.default
KERNELS = ("nbits", "int8")

# export-check floors (SQNR of the whole model's output, onnxruntime against the torch program computing what
# the rules' emulations say onnxruntime computes: float16 scales, int8 activations), per emitted computation.
# Float products are exact up to rounding (> 60 dB). With int8 activations the emulation rounds the same
# values, but one tie that falls the other way in float changes a code and spreads through attention: a
# 4-bit SmolLM2 measured 28 dB, W8A8 31 dB, a tiny llama 60 dB; a wrong layout measures near 0 dB.
INT8_ACTIVATIONS_DB = 20.0
ACCURACY_LEVEL_DB = {0: EXACT_DB, 1: EXACT_DB, 2: 40.0, 3: 30.0, 4: INT8_ACTIVATIONS_DB}


def block_size(group: int, in_features: int, groups: int, what: str) -> int:
    """onnxruntime's block (a power of two >= 16) for groups of ``group`` columns: the group itself, or for
    one group per row the largest such power up to 128 that divides K (else 64, the last block partial)."""
    if group >= 16 and not group & (group - 1):
        return group
    if groups == 1:
        block = 128
        while block >= 16 and in_features % block:
            block //= 2
        return block if block >= 16 else 64
    raise TargetError(
        f"onnxruntime cannot lower {what} with groups of {group} columns: MatMulNBits and GatherBlockQuantized "
        "need blocks of a power of two >= 16. Quantize with group_size 16, 32, 64, 128 ... or null (one group "
        "per row), or choose kernel: int8"
    )


def _as_blocks(scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group: int, block: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [N, G] and packed zero points repeated from groups onto blocks (g / block per group)."""
    if block == group:
        return scales, zeros
    repeat = -(-group // block)
    scales = scales.repeat_interleave(repeat, dim=1)
    if zeros is not None:  # unpack, repeat, pack again: float ops on a constant, folded at session start
        zp = unpack_codes(zeros, bits, scales.shape[1] // repeat).repeat_interleave(repeat, dim=1)
        if bits == 4:
            zp = torch.nn.functional.pad(zp, (0, zp.shape[1] % 2))
            zp = zp[:, 0::2] + 16 * zp[:, 1::2]
        zeros = zp.to(torch.uint8)
    return scales, zeros


def _w8a8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times the int8 weight ``w`` [K, N] with row scales ``s`` [N]: each token scaled to absmax 1,
    then onnxruntime's fused DynamicQuantizeMatMul, then scaled back.

    DynamicQuantizeMatMul alone quantizes x per tensor (uint8 asymmetric): one loud token costs every row,
    and on SmolLM2-135M after SmoothQuant the perplexity is 16.93 against 15.07 with per-token scales (fp32
    14.94). Dividing each row by its absmax first (Abs, ReduceMax, Div; Mul after) makes that one scale a
    per-token one for 3 small elementwise ops; it measured 0.21-0.35 ms against 0.52-1.04 ms for fp32 MatMul
    per SmolLM2 linear at 128 tokens (``tools/bench_w8a8.py``, BENCHMARKS.md). MLAS takes its u8 x s8 kernel
    for the int8 B. Caveat: without VNNI, MLAS's u8 x s8 kernel on AVX2 can saturate int16 pair sums
    (onnxruntime's documented reduce_range issue), where onnxruntime would drift from the reference.
    """
    rows = x.abs().amax(-1, keepdim=True).clamp(min=TINY)  # [..., 1]
    y = torch.onnx.ops.symbolic(
        f"{MS}::DynamicQuantizeMatMul", [x / rows, w, s], dtype=x.dtype, shape=[*x.shape[:-1], w.shape[1]],
        version=1,
    ) * rows
    return y + bias if bias is not None else y


# The int8 kernel's storage. The file keeps the packed codes (4 bits stay 4 bits) and onnxruntime computes the
# int8 weight [K, N] from them at session start by constant folding, which keeps every intermediate tensor of
# the whole graph alive until it is done: its peak is the bytes per weight of the ops below times the number of
# weights (SmolLM2-135M: 3.2 GB at ~24 bytes per weight for an unpack-requantize chain traced from int8_weight).
# So the export computes everything that is per group once (the step of each group's requantization, the
# per-row scale) and stores the codes transposed and grouped, [G, g * bits / 8, N], a 4-bit byte holding
# columns j and j + g/2 of its group (low, high nibble): unpacking is two byte ops and a Concat, and the rest
# is one Cast to float16, one Sub of the zero points and one blocked QuantizeLinear (opset 21) with its
# rounding: ~8 bytes per weight at session start.
FP16_MAX = 65504.0


def int8_storage(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int,
                 bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """What the int8 kernel stores for one quantized weight, computed eagerly at export:

        codes  [G, g * bits / 8, N] uint8   transposed per group; 4 bits: column j low nibble, j + g/2 high
        zeros  [G, 1, N * bits / 8] uint8   the zero points, packed along N (None: symmetric, 2^(bits-1))
        step   [G, 1, N] float16            each group's step in int8 units of its row: row / s for the
                                            group's scale s, so that q = round((code - zero) / step)
        row    [N] float32                  ~r / 127, the int8 weight's scale per output channel (float16
                                            values where float16's normal numbers reach them: then the file
                                            stores them as float16, ``row_requantization``)
    """
    n, groups = scales.shape
    codes, zp = grouped_codes(qweight, zeros, bits, groups, group_size)
    factor, row = row_requantization(codes, zp, scales)
    # step = 1 / factor; a group whose codes all equal the zero point is 0 at any step: 1/128 keeps it finite
    # and every other group unchanged (their |step| >= reach / 127 >= 1/127); past float16's range q rounds
    # to 0 anyway; symmetric scales may be negative, and the step keeps their sign
    step = (1 / factor.abs()).clamp(1 / 128, FP16_MAX) * torch.where(factor < 0, -1.0, 1.0)
    grouped = codes.permute(1, 2, 0)  # [G, g, N]
    if bits == 4:
        if group_size % 2:  # one group per row of odd K: a padding column, cut after requantization
            grouped = torch.nn.functional.pad(grouped, (0, 0, 0, 1))
        half = grouped.shape[1] // 2
        grouped = grouped[:, :half] | (grouped[:, half:] << 4)
    stored_zeros = None
    if zeros is not None:  # [G, 1, N], 4 bits two per byte along N (even n low)
        stored_zeros = zp.T.to(torch.uint8)[:, None, :]
        if bits == 4:
            stored_zeros = torch.nn.functional.pad(stored_zeros, (0, n % 2))
            stored_zeros = stored_zeros[..., 0::2] | (stored_zeros[..., 1::2] << 4)
        stored_zeros = stored_zeros.contiguous()
    return grouped.contiguous(), stored_zeros, step.T.to(torch.float16)[:, None, :].contiguous(), row


def int8_requantized(codes: torch.Tensor, zeros: torch.Tensor | None, step: torch.Tensor, in_features: int,
                     bits: int) -> torch.Tensor:
    """The int8 weight [K, N] that onnxruntime folds from ``int8_storage``: round((code - zero) / step),
    half to even, the quotient rounded to float16 first (QuantizeLinear divides in its inputs' float16)."""
    if bits == 4:
        codes = torch.cat((codes & 15, codes >> 4), dim=1)
        if zeros is not None:
            zeros = torch.stack((zeros & 15, zeros >> 4), dim=-1).flatten(-2)[..., : codes.shape[-1]]
    zero = zeros.to(torch.int16) if zeros is not None else 1 << (bits - 1)
    quotient = (codes.to(torch.int16) - zero).half() / step
    q = torch.round(quotient.float()).clamp(-128, 127).to(torch.int8)
    return q.reshape(-1, q.shape[-1])[:in_features]


def _nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and high nibbles of uint8 ``packed`` as ONNX's uint8 BitwiseAnd and BitShift."""
    low = torch.onnx.ops.symbolic("BitwiseAnd", [packed, torch.tensor(15, dtype=torch.uint8)],
                                  dtype=torch.uint8, shape=packed.shape, version=18)
    high = torch.onnx.ops.symbolic("BitShift", [packed, torch.tensor(4, dtype=torch.uint8)],
                                   attrs={"direction": "RIGHT"}, dtype=torch.uint8, shape=packed.shape, version=11)
    return low, high


def _requantize_ops(codes: torch.Tensor, zeros: torch.Tensor | None, step: torch.Tensor, in_features: int,
                    bits: int) -> torch.Tensor:
    """``int8_requantized`` as ONNX ops on the stored initializers (folded by onnxruntime at session start)."""
    if bits == 4:
        codes = torch.cat(_nibbles(codes), dim=1)
        if zeros is not None:
            zeros = torch.stack(_nibbles(zeros), dim=-1).flatten(-2)[..., : codes.shape[-1]]
    # the zero point subtracted in integers (onnxruntime folds no float16 Sub on CPU): int8 holds 4-bit codes,
    # 8-bit ones (up to 255) need int16
    wide = torch.int8 if bits == 4 else torch.int16
    zero = zeros.to(wide) if zeros is not None else torch.tensor(1 << (bits - 1), dtype=wide)
    centered = (codes.to(wide) - zero).to(torch.float16)
    q = torch.onnx.ops.symbolic(
        "QuantizeLinear", [centered, step],
        attrs={"axis": 1, "block_size": centered.shape[1], "output_dtype": 3},  # 3: TensorProto.INT8
        dtype=torch.int8, shape=centered.shape, version=21,
    )
    return q.reshape(-1, q.shape[-1])[:in_features]


def _int8_store(kernel: str) -> Callable[..., tuple[object, ...] | None]:
    """The linear rule's storage for the int8 kernel (nothing changed for MatMulNBits): an exact 8-bit
    symmetric weight with one group per row as its int8 [K, N] itself, or, when a tied table shares its codes,
    those codes (``_shifted_ops``); any other weight as ``int8_storage``."""
    def store(x, qweight, scales, zeros, bias, in_features, bits, group_size, activation_bits=0, *,  # noqa: ANN001, ANN202, E501
              shared=frozenset()):
        if not (activation_bits == 8 or kernel == "int8"):
            return None
        if bits == 8 and zeros is None and scales.shape[1] == 1:
            if 1 in shared:
                return (x, "shared", qweight, None, None, scales[:, 0].float(), bias, in_features, bits)
            weight = (qweight[:, :in_features].to(torch.int16) - 128).to(torch.int8).T.contiguous()
            return (x, "int8", weight, None, None, scales[:, 0].float(), bias, in_features, bits)
        if bits == 4 and group_size % 2 and scales.shape[1] > 1:
            raise TargetError(f"onnxruntime's int8 kernel cannot store 4-bit groups of an odd {group_size} columns")
        return (x, "grouped", *int8_storage(qweight, scales, zeros, in_features, bits, group_size), bias,
                in_features, bits)

    return store


def _shifted_ops(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """Symmetric 8-bit codes [N, K'] (uint8, zero point 128) as the int8 weight [K, N], in ops onnxruntime folds
    at session start: QuantizeLinear of the codes in float16 (exact) with step 1 and zero point -128."""
    q = torch.onnx.ops.symbolic(
        "QuantizeLinear", [codes.to(torch.float16), torch.tensor(1.0, dtype=torch.float16),
                           torch.tensor(-128, dtype=torch.int8)],
        dtype=torch.int8, shape=codes.shape, version=21,
    )
    return q[:, :in_features].T


def _round_scales(scales: torch.Tensor, fp16: bool) -> torch.Tensor:
    return scales.to(torch.float16).to(scales.dtype) if fp16 else scales


def _fp16_scales(gm: torch.fx.GraphModule) -> None:
    """Every quantized op's scales rounded to float16 values in place (the copy being exported): the file then
    stores them as float16 (graphpress.lowering.onnx.compact), and the scales feed the rules unchanged."""
    done = set()
    for node in gm.graph.nodes:
        index = {LINEAR: 2, EMBEDDING: 1}.get(node.target) if node.op == "call_function" else None
        scales = node.args[index] if index is not None else None
        if isinstance(scales, torch.fx.Node) and scales.op == "get_attr" and scales.target not in done:
            done.add(scales.target)
            t = get_tensor(gm, scales)
            set_tensor(gm, scales.target, _round_scales(t, True), buffer=not isinstance(t, torch.nn.Parameter))


def _linear_rule(kernel: str, accuracy_level: int) -> Callable[..., torch.Tensor]:
    def lower(x, *args):  # noqa: ANN001, ANN202
        if isinstance(args[0], str):  # stored by _int8_store
            layout, codes, zeros, step, row, bias, in_features, bits = args
            weight = (codes if layout == "int8" else _shifted_ops(codes, in_features) if layout == "shared"
                      else _requantize_ops(codes, zeros, step, in_features, bits))
            return _w8a8(x, weight, row, bias)
        return _matmul_nbits(x, *args)

    def _matmul_nbits(x, qweight, scales, zeros, bias, in_features, bits, group_size, activation_bits=0):  # noqa: ANN001, ANN202, E501
        n, groups = scales.shape
        block = block_size(group_size, in_features, groups, f"a {bits}-bit linear [{n}, {in_features}]")
        scales, zeros = _as_blocks(scales, zeros, bits, group_size, block)
        k_blocks = scales.shape[1]
        pad = k_blocks * block * bits // 8 - qweight.shape[1]  # a partial last block: bytes x never meets
        codes = torch.nn.functional.pad(qweight, (0, pad)) if pad else qweight
        inputs = [x, codes.reshape(n, k_blocks, block * bits // 8), scales, zeros]
        if bias is not None:
            inputs += [None, bias]  # g_idx (unused) sits between zero_points and bias
        while inputs[-1] is None:
            inputs.pop()
        return torch.onnx.ops.symbolic(
            f"{MS}::MatMulNBits",
            inputs,
            attrs={"K": in_features, "N": n, "bits": bits, "block_size": block, "accuracy_level": accuracy_level},
            dtype=x.dtype,
            shape=[*x.shape[:-1], n],
            version=1,
        )

    return lower


def quantize_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] rounded as MatMulNBits at accuracy_level 4 rounds it: symmetric int8 per row and block of K
    (scale = amax / 127, round half to even)."""
    k = x.shape[-1]
    blocks = -(-k // block)
    xb = torch.nn.functional.pad(x.float(), (0, blocks * block - k)).unflatten(-1, (blocks, block))
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).flatten(-2)[..., :k].to(x.dtype)


def _linear_emulation(kernel: str, accuracy_level: int, fp16_scales: bool) -> Callable[..., torch.Tensor]:
    """What onnxruntime computes for quantized_linear under these options (the export check's reference)."""
    def emulate(x, qweight, scales, zeros, bias, in_features, bits, group_size, activation_bits=0):  # noqa: ANN001, ANN202, E501
        scales = _round_scales(scales, fp16_scales)
        if activation_bits == 8 or kernel == "int8":
            stored = _int8_store(kernel)(x, qweight, scales, zeros, bias, in_features, bits, group_size,
                                         activation_bits)
            assert stored is not None
            layout, codes, zeros, step, row = stored[1:6]  # called without shared: "int8" or "grouped"
            weight = codes if layout == "int8" else int8_requantized(codes, zeros, step, in_features, bits)
            y = w8a8_product(x, weight.T, row)
            return (y if bias is None else y + bias).to(x.dtype)
        if accuracy_level == 4:
            x = quantize_blocks(x, block_size(group_size, in_features, scales.shape[1], "a linear"))
        w = dequantize(qweight, scales, zeros, in_features, bits, group_size).to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)

    return emulate


def _embedding_rule() -> Callable[..., torch.Tensor]:
    def lower(qweight, scales, zeros, indices, bits, group_size, hidden):  # noqa: ANN001, ANN202
        v, groups = scales.shape
        if hidden * bits % 8:
            raise TargetError(f"onnxruntime cannot gather a {bits}-bit table of H={hidden} columns: "
                              "GatherBlockQuantized reads H as whole bytes. Quantize it with 8 bits")
        block = block_size(group_size, hidden, groups, f"a {bits}-bit embedding [{v}, {hidden}]")
        scales, zeros = _as_blocks(scales, zeros, bits, group_size, block)
        blocks = -(-hidden // block)  # the op reads no padded block
        data = qweight[:, : hidden * bits // 8]
        inputs = [data, indices, scales[:, :blocks]] + ([] if zeros is None else [zeros[:, : -(-blocks * bits // 8)]])
        return torch.onnx.ops.symbolic(
            f"{MS}::GatherBlockQuantized",
            inputs,
            attrs={"bits": bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
            dtype=scales.dtype,
            shape=[*indices.shape, hidden],
            version=1,
        )

    return lower


def _rotary_halves(cos: torch.Tensor, sin: torch.Tensor, batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """graphpress::rotary_embedding's [B or 1, 1, S, D] tables as ONNX RotaryEmbedding reads them, [B, S, D/2]
    (fuse_rotary checked that the halves repeat)."""
    half = cos.shape[-1] // 2
    return tuple(t[:, 0, :, :half].expand(batch, -1, -1) for t in (cos, sin))


def rotary_rule(x, cos, sin):  # noqa: ANN001, ANN202
    """ONNX RotaryEmbedding (opset 23) of [B, H, S, D]."""
    return torch.onnx.ops.rotary_embedding(x, *_rotary_halves(cos, sin, x.shape[0]))


def cached_attention_rule(q, k, v, past_k, past_v, mask, cos, sin, cos_table, sin_table, heads, kv_heads, scale,  # noqa: ANN001, ANN202, E501
                          k_scale=None, v_scale=None):  # noqa: ANN001
    """graphpress::cached_attention as one com.microsoft GroupQueryAttention: q, k and v packed as one input when
    they come from one projection, rotated inside the kernel when the op carries the rotary tables by position
    (else one RotaryEmbedding of q and one of k first, on tokens [B, S, H * D]). The causal mask is built inside
    from each row's length (the attention mask's sum) and the rotary positions from the past's length, so the
    runtime reads padding as trailing (right padding, as onnxruntime-genai feeds it). An int8 cache (the op's
    k_scale and v_scale) is the kernel's own: codes in the past and present, one static scale per channel."""
    b, s = q.shape[0], q.shape[1]
    d = int(past_k.shape[3])
    total = past_k.shape[2] + s
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": float(scale)}
    rotary: list[torch.Tensor | None] = []
    if cos_table is not None:
        attrs["do_rotary"] = 1
        rotary = [cos_table, sin_table]
    elif cos is not None:
        q, k, v = unpack(q, k, v, heads, kv_heads, d)
        halves = _rotary_halves(cos, sin, b)
        q, k = (torch.onnx.ops.rotary_embedding(x, *halves, num_heads=n) for x, n in ((q, heads), (k, kv_heads)))
    lengths = (mask.sum(-1) - 1).to(torch.int32)
    longest = torch.scalar_tensor(mask.shape[-1], dtype=torch.int32)
    quantized: list[torch.Tensor | None] = []
    if k_scale is not None and v_scale is not None:
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        # inputs 7..11 (cos and sin caches, position ids, attention bias, head sink) before the scales
        quantized = [*(rotary or [None, None]), None, None, None, k_scale, v_scale]
        rotary = []
    out, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
        f"{MS}::GroupQueryAttention",
        [q, k, v, past_k, past_v, lengths, longest, *rotary, *quantized],
        attrs=attrs,
        dtypes=[q.dtype, past_k.dtype, past_v.dtype],
        shapes=[[b, s, heads * d], [b, kv_heads, total, d], [b, kv_heads, total, d]],
        version=1,
    )
    return out, present_k, present_v


def rms_norm_rule(x, normalized_shape, weight=None, eps=None):  # noqa: ANN001, ANN202
    """aten.rms_norm as SimplifiedLayerNormalization (onnxruntime's RMS norm, in the ONNX domain), which
    onnxruntime's optimizer fuses with the residual Add before it into one SkipSimplifiedLayerNormalization; it
    leaves ONNX's RMSNormalization (opset 23) as two nodes. A norm without a weight (fold_norm_scales moved it
    into the next linear) gets ones."""
    if weight is None:
        weight = torch.ones(normalized_shape, dtype=x.dtype)
    return torch.onnx.ops.symbolic(
        "SimplifiedLayerNormalization",
        [x, weight],
        attrs={"axis": -len(normalized_shape),
               "epsilon": float(eps if eps is not None else torch.finfo(x.dtype).eps)},
        dtype=x.dtype,
        shape=x.shape,
    )


def skip_norms(model: object) -> None:
    """Residual Add + SimplifiedLayerNormalization -> one com.microsoft SkipSimplifiedLayerNormalization (its
    fourth output is the sum, for the next residual): onnxscript's rewrite rules, on the exported model.

    The rules are made for each model: onnxscript's module-level rule set keeps the last graph it matched (its
    matchers' ``_graph``), and with it every initializer of that model, for the rest of the process (SmolLM2's
    fp32 reference export: a 0.5 GB copy of the weights alive through every later stage of a compress)."""
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.skip_normalization import SkipRmsNormFusion

    pattern.RewriteRuleSet([
        SkipRmsNormFusion.rule("SkipRmsNormPreBias", has_bias=True, bias_pre_add=True),
        SkipRmsNormFusion.rule("SkipRmsNormBias", has_bias=True, bias_pre_add=False),
        SkipRmsNormFusion.rule("SkipRmsNorm", has_bias=False),
    ]).apply_to_model(model)


def onnxruntime_rules(kernel: str = "nbits", accuracy_level: int = 4, fp16_scales: bool = True) -> RuleTable:
    """The onnxruntime target's rules for the given options (see the module docstring)."""
    if kernel not in KERNELS:
        raise TargetError(f"onnxruntime option kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVEL_DB:
        raise TargetError(f"onnxruntime option accuracy_level must be 0..4, not {accuracy_level!r}")
    if not isinstance(fp16_scales, bool):
        raise TargetError(f"onnxruntime option fp16_scales must be true or false, not {fp16_scales!r}")
    linear_db = INT8_ACTIVATIONS_DB if kernel == "int8" else ACCURACY_LEVEL_DB[accuracy_level]

    def linear_floor(*args: object) -> float:
        activation_bits = args[8] if len(args) > 8 else 0
        return INT8_ACTIVATIONS_DB if activation_bits == 8 else linear_db

    def embedding_emulation(qweight, scales, zeros, indices, bits, group_size, hidden):  # noqa: ANN001, ANN202
        return quantized_embedding_reference(qweight, _round_scales(scales, fp16_scales), zeros, indices, bits,
                                             group_size, hidden)

    return RuleTable((
        Rule(LINEAR, _linear_rule(kernel, accuracy_level), check_sqnr_db=linear_floor,
             emulate=_linear_emulation(kernel, accuracy_level, fp16_scales), store=_int8_store(kernel)),
        Rule(EMBEDDING, _embedding_rule(), emulate=embedding_emulation),
        Rule(torch.ops.graphpress.rotary_embedding.default, rotary_rule, target="onnx"),
        Rule(torch.ops.graphpress.cached_attention.default, cached_attention_rule),
        Rule(torch.ops.aten.rms_norm.default, rms_norm_rule),
    ), prepare=chain(_fp16_scales if fp16_scales else None, computed_rotary_tables), finish=skip_norms)
