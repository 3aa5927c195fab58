"""``graphpress::gather_nbits``: rows of a block-quantized table, y = dequant(table)[indices].

The table is stored in the layout of ``com.microsoft::MatMulNBits``' B, so that a tied output projection
(``graphpress::matmul_nbits`` over the same table) reads the very same tensor and the artifact holds the
integers once:

    qweight  [V, k_blocks, block_size * bits / 8] uint8   codes along H, 4-bit: low nibble = even index
    scales   [V, k_blocks] float
    zeros    [V, ceil(k_blocks * bits / 8)] uint8 or None  4-bit packed like the codes; None: 2^(bits-1)
    indices  [...] int64
    y        [..., H] float,  y[..., h] = (code[i, h] - zero[i, h // block_size]) * scale[i, h // block_size]
             with i = indices[...]

H must be a multiple of block_size (and, for 4 bits, even): then qweight's bytes are exactly
``GatherBlockQuantized``'s data [V, H * bits / 8] and lowering is a reshape of the one stored tensor.
This file holds the reference (pure PyTorch) implementation; it unpacks only the gathered rows.
"""

from __future__ import annotations

import torch

from graphpress.kernels.matmul_nbits import unpack_codes


def check_table(hidden: int, bits: int, block_size: int) -> None:
    """Refuse a table shape whose MatMulNBits bytes are not GatherBlockQuantized's bytes."""
    if bits not in (4, 8):
        raise ValueError(f"gather_nbits supports 4 or 8 bits, not {bits}")
    if hidden % block_size:
        raise ValueError(
            f"gather_nbits: H={hidden} is not a multiple of block_size={block_size}; the table would need a "
            "padded last block, which GatherBlockQuantized cannot read. Choose a block size that divides H"
        )


def gather_nbits_reference(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    indices: torch.Tensor,
    bits: int,
    block_size: int,
    hidden: int,
) -> torch.Tensor:
    check_table(hidden, bits, block_size)
    k_blocks = qweight.shape[1]
    rows = qweight[indices]  # [..., k_blocks, block_size * bits / 8]
    codes = unpack_codes(rows, bits, block_size)  # [..., k_blocks, block_size]
    s = scales[indices].float()  # [..., k_blocks]
    if zeros is None:
        zp = torch.full_like(s, float(1 << (bits - 1)))
    else:
        zp = unpack_codes(zeros[indices], bits, k_blocks)  # [..., k_blocks]
    y = (codes - zp[..., None]) * s[..., None]
    return y.flatten(-2)[..., :hidden].to(scales.dtype)


gather_nbits = torch.library.custom_op("graphpress::gather_nbits", gather_nbits_reference, mutates_args=())


@gather_nbits.register_fake
def _(qweight, scales, zeros, indices, bits, block_size, hidden):  # noqa: ANN001, ANN202
    return scales.new_empty((*indices.shape, hidden))
