"""``graphpress::matmul_nbits``: y = x @ dequant(B)^T (+ bias), weights in onnxruntime's MatMulNBits layout.

The quantized weight is stored once, packed, in exactly the layout of ``com.microsoft::MatMulNBits``, so the
program's bytes are the artifact's bytes and the lowering is one node:

    x:      [..., K] float
    qweight [N, k_blocks, block_size * bits / 8] uint8   codes, 4-bit: two per byte, low nibble = even index
    scales  [N, k_blocks] float
    zeros   [N, ceil(k_blocks * bits / 8)] uint8 or None zero points, 4-bit packed like the codes;
                                                        None: 2^(bits-1) (symmetric)
    bias    [N] float or None
    w[n, k] = (code[n, k] - zero[n, k // block_size]) * scale[n, k // block_size]   for k < K
    accuracy_level 0: x stays float. 4: x is quantized per row and block of ``block_size`` along K to
    symmetric int8 (scale = amax / 127, round half to even), as onnxruntime's int8 kernels do, so the
    program computes what the artifact computes.
    kernel "nbits": computed as above (onnxruntime MatMulNBits). "int8": the weight is dequantized and
    requantized symmetric int8 per output channel once (at session start, by constant folding), then
    multiplied as ``graphpress::matmul_w8a8`` does, with per-token int8 activations: integer GEMM speed
    (~2.5x MatMulNBits on AVX-512 VNNI at 128 tokens) from the same packed bytes, at the memory of int8
    weights while running. The requantization adds an error ~1/8 of a 4-bit step (none for 8-bit codes
    whose blocks of a row share one scale); ``accuracy_level`` is then unused.

K may be smaller than k_blocks * block_size: the padded columns never meet x. This file holds the reference
(pure PyTorch) implementation; faster kernels register as other backends of the same op.
"""

from __future__ import annotations

import torch

from graphpress.kernels.matmul_w8a8 import matmul_w8a8_reference
from graphpress.quant.int8 import symmetric_int8_rows

KERNELS = ("nbits", "int8")


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [..., count * bits / 8] -> float codes [..., count] (4-bit: low nibble first).

    Written in float arithmetic (exact for bytes) rather than shifts and masks: it is also what lowering
    traces for a rule that unpacks at session start, and every exporter and runtime types float ops alike.
    """
    p = packed.float()
    if bits == 8:
        return p[..., :count]
    if bits == 4:
        high = torch.floor(p / 16)
        return torch.stack((p - high * 16, high), dim=-1).flatten(-2)[..., :count]
    raise ValueError(f"matmul_nbits supports 4 or 8 bits, not {bits}")


def dequantize_nbits(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, K: int, bits: int, block_size: int
) -> torch.Tensor:
    """The float weight [N, K] that the packed tensors stand for."""
    N, k_blocks, _ = qweight.shape
    codes = unpack_codes(qweight, bits, block_size)  # [N, k_blocks, block_size]
    zp = float(1 << (bits - 1)) if zeros is None else unpack_codes(zeros, bits, k_blocks)[..., None]
    w = (codes - zp) * scales.float().reshape(N, k_blocks, 1)
    return w.reshape(N, k_blocks * block_size)[:, :K]


def quantize_activations(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [..., K] fake-quantized to int8 per row and block of K: what MatMulNBits accuracy_level 4 sees."""
    K = x.shape[-1]
    k_blocks = -(-K // block_size)
    xb = torch.nn.functional.pad(x.float(), (0, k_blocks * block_size - K)).unflatten(-1, (k_blocks, block_size))
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv) * (amax / 127.0)
    return q.flatten(-2)[..., :K].to(x.dtype)


def matmul_nbits_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    K: int,
    N: int,
    bits: int,
    block_size: int,
    accuracy_level: int = 0,
    kernel: str = "nbits",
) -> torch.Tensor:
    if kernel == "int8":
        q, s = symmetric_int8_rows(dequantize_nbits(qweight, scales, zeros, K, bits, block_size))
        return matmul_w8a8_reference(x, q.T, s, bias)
    if kernel != "nbits":
        raise ValueError(f"matmul_nbits kernel must be one of {KERNELS}, not {kernel!r}")
    w = dequantize_nbits(qweight, scales, zeros, K, bits, block_size).to(x.dtype)
    if accuracy_level == 4:
        x = quantize_activations(x, block_size)
    return torch.nn.functional.linear(x, w, bias)


matmul_nbits = torch.library.custom_op("graphpress::matmul_nbits", matmul_nbits_reference, mutates_args=())


@matmul_nbits.register_fake
def _(x, qweight, scales, zeros, bias, K, N, bits, block_size, accuracy_level=0, kernel="nbits"):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], N))
