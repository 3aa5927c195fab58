"""onnxruntime layouts for QuantizedWeight: a relayout, never a requantization.

QuantizedWeight [N, K] (groups g) -> com.microsoft::MatMulNBits(A, B, scales[, zero_points]) computes
    Y = A @ W_hat^T,  W_hat[n, k] = (code[n, k] - zp[n, k // bs]) * scale[n, k // bs]
with (checked against onnxruntime 1.32 in tests/quant/test_pack.py)
    B            uint8 [N, k_blocks, bs * bits / 8]   k_blocks = ceil(K / bs); codes packed along K inside each
                                                     block, the last block padded (onnxruntime ignores the pad)
    scales       float [N, k_blocks]                  (the type of A)
    zero_points  uint8 [N, ceil(k_blocks * bits / 8)] packed like B; omitted: 2^(bits-1) (8 for 4 bits, 128 for 8)
    attributes   K, N, bits, block_size (power of two >= 16), accuracy_level (left to the caller)
4-bit packing: two codes per byte, element 2i in the low nibble, 2i+1 in the high nibble; an odd count of
zero points is padded with a 0 nibble.

QuantizedWeight [V, H] (an embedding table) -> com.microsoft::GatherBlockQuantized(data, indices, scales
[, zero_points]) with quantize_axis = 1 (last), gather_axis = 0, and
    data         uint8 [V, ceil(H * bits / 8)]        NOT padded to whole blocks (unlike B): onnxruntime infers
                                                     H = 2 * data.shape[1] for 4 bits, so odd H is refused
    scales       float [V, ceil(H / bs)]
    zero_points  uint8 [V, ceil(ceil(H / bs) * bits / 8)]; omitted: 2^(bits-1) for uint8 data
(The op also takes int4 / uint4 typed data, whose default zero point is 0; the uint8 form is used here so
that symmetric weights need no zero points in either op.)

A block may be smaller than a group (the group's parameters are repeated over its blocks); a per-channel
weight becomes blocks of any size. A block larger than a group cannot be expressed and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphpress.quant.qweight import QuantizedWeight, QuantSpec

DEFAULT_BLOCK_SIZE = 128  # for per-channel weights, which fit any block size


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> bytes [..., ceil(n * bits / 8)]; 4 bits: element 2i low nibble, 2i+1 high."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0xF) | (codes[..., 1::2] << 4)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_bits: bytes [..., m] -> uint8 codes [..., n]."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :n].copy()
    out = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out[..., :n]


def _zero_points(q: QuantizedWeight, zeros: np.ndarray, wanted: bool | None, op: str) -> np.ndarray | None:
    """Packed zero points, or None where the op's default 2^(bits-1) is right (symmetric weights)."""
    if wanted is None:
        wanted = not q.spec.symmetric
    if not wanted and (zeros != q.spec.midpoint).any():
        raise ValueError(
            f"{op}: zero_points=False but this {q.spec} weight has zero points other than the default "
            f"{q.spec.midpoint}; leave zero_points=None"
        )
    return pack_bits(zeros, q.spec.bits) if wanted else None


def _blocks(q: QuantizedWeight, block_size: int | None, op: str) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Re-express q's groups as blocks of block_size along K.

    Returns (block_size, codes [N, k_blocks * bs] (padding = zero point), scales, zeros [N, k_blocks]).
    """
    g, k = q.group_len, q.in_features
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE if q.spec.group_size is None else q.spec.group_size
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{op}: block_size={block_size} must be a power of two >= 16")
    if q.spec.group_size is not None and g % block_size:
        raise ValueError(
            f"{op}: block_size={block_size} is larger than the weight's group size {g}; one block would need "
            f"several scales. Use block_size <= {g} or quantize with group_size={block_size}"
        )
    n_blocks = -(-k // block_size)
    grp = (np.arange(n_blocks) * block_size) // g  # group of each block
    scales = q.scales.cpu().numpy()[:, grp]
    zeros = q.zeros.cpu().numpy()[:, grp]
    codes = np.repeat(zeros, block_size, axis=1)  # [N, k_blocks * bs]; pad columns at the zero point
    codes[:, :k] = q.codes.cpu().numpy()[:, :k]
    return block_size, codes, scales.astype(np.float32), zeros


@dataclass(frozen=True)
class MatMulNBitsWeight:
    """Initializers and attributes of one com.microsoft::MatMulNBits node (domain version 1)."""

    B: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)]; None: 2^(bits-1)
    K: int
    N: int
    bits: int
    block_size: int

    def attrs(self) -> dict[str, int]:
        return {"K": self.K, "N": self.N, "bits": self.bits, "block_size": self.block_size}


def pack_matmulnbits(
    q: QuantizedWeight, block_size: int | None = None, *, zero_points: bool | None = None
) -> MatMulNBitsWeight:
    """q [N, K] -> MatMulNBits inputs. block_size defaults to the group size (128 for per channel);
    zero_points=None writes them only for asymmetric weights (symmetric ones use the op's default);
    scales are float32: cast them to float16 for a float16 A."""
    bs, codes, scales, zeros = _blocks(q, block_size, "pack_matmulnbits")
    n, bits = q.out_features, q.spec.bits
    B = pack_bits(codes.reshape(n, -1, bs), bits)  # [N, k_blocks, bs * bits / 8]
    zp = _zero_points(q, zeros, zero_points, "pack_matmulnbits")
    return MatMulNBitsWeight(B, scales, zp, q.in_features, n, bits, bs)


def unpack_matmulnbits(p: MatMulNBitsWeight) -> QuantizedWeight:
    """MatMulNBits inputs -> QuantizedWeight with group_size = block_size (symmetric iff no zero points)."""
    n, k_blocks, _ = p.B.shape
    codes = unpack_bits(p.B, p.bits, p.block_size).reshape(n, k_blocks * p.block_size)
    return _from_blocks(codes, p.scales, p.zero_points, p.bits, p.block_size, p.K)


def _from_blocks(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                 block_size: int, k: int) -> QuantizedWeight:
    """Unpacked codes [rows, >= K], scales [rows, blocks] and packed zero points -> QuantizedWeight."""
    rows, n_blocks = scales.shape
    if zero_points is None:
        zeros = np.full((rows, n_blocks), 1 << (bits - 1), np.uint8)
    else:
        zeros = unpack_bits(zero_points, bits, n_blocks)
    spec = QuantSpec(bits, block_size, symmetric=zero_points is None)
    return QuantizedWeight.from_codes(torch.from_numpy(codes), torch.from_numpy(scales.astype(np.float32)),
                                      torch.from_numpy(zeros), spec, k)


@dataclass(frozen=True)
class GatherBlockQuantizedWeight:
    """Initializers and attributes of one com.microsoft::GatherBlockQuantized node over a table [V, H]."""

    data: np.ndarray  # uint8 [V, ceil(H * bits / 8)]
    scales: np.ndarray  # float32 [V, ceil(H / block_size)]
    zero_points: np.ndarray | None  # uint8 [V, ceil(n_blocks * bits / 8)]; None: 2^(bits-1)
    bits: int
    block_size: int
    hidden: int  # H

    def attrs(self) -> dict[str, int]:
        return {"bits": self.bits, "block_size": self.block_size, "quantize_axis": 1, "gather_axis": 0}


def pack_gather_block_quantized(
    q: QuantizedWeight, block_size: int | None = None, *, zero_points: bool | None = None
) -> GatherBlockQuantizedWeight:
    """An embedding table quantized along H, q [V, H] -> GatherBlockQuantized inputs (gather on axis 0)."""
    h, bits = q.in_features, q.spec.bits
    if bits == 4 and h % 2:
        raise ValueError(
            f"pack_gather_block_quantized: H={h} is odd; with 4 bits onnxruntime reads H as twice the packed "
            "width. Quantize this table with bits=8"
        )
    bs, codes, scales, zeros = _blocks(q, block_size, "pack_gather_block_quantized")
    data = pack_bits(codes[:, :h], bits)  # [V, H * bits / 8]: no block padding in this op
    zp = _zero_points(q, zeros, zero_points, "pack_gather_block_quantized")
    return GatherBlockQuantizedWeight(data, scales, zp, bits, bs, h)


def unpack_gather_block_quantized(p: GatherBlockQuantizedWeight) -> QuantizedWeight:
    return _from_blocks(unpack_bits(p.data, p.bits, p.hidden), p.scales, p.zero_points, p.bits, p.block_size,
                        p.hidden)
