"""Weight layouts for the GPU kernels, made once per weight from the op's target-neutral codes (pure tensor code),
kept beside the weight while it lives (``kept``), and the activations as the kernels read them (``as_rows``).

4-bit (``gpu_layout``): per row and group of g codes, g / 8 32-bit words (little-endian); nibble i (bits
4i..4i+3) of word w holds the code of column i * g/8 + w of the group. Nibble position i covers the contiguous
columns [i * g/8, (i + 1) * g/8) of every group, and byte j of a group holds nibbles 2 (j % 4) (low) and
2 (j % 4) + 1 (high) of word j // 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from graphpress.kernels.quantized import unpack_uint8

_KEPT: dict[str, WeakTensorKeyDictionary] = {}


def kept(kind: str, weight: torch.Tensor, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per ``kind`` and weight, kept while the tensor lives and is not modified."""
    cache = _KEPT.setdefault(kind, WeakTensorKeyDictionary())
    entry = cache.get(weight)
    if entry is None or entry[0] != weight._version:
        entry = (weight._version, make())
        cache[weight] = entry
    return entry[1]


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as rows [M, K] with unit stride along K (a view when it already has one)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def gpu_layout(qweight: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
    """The op's 4-bit codes [N, ceil(G * g / 2)] uint8 -> int32 [N, G * g / 8] (module docstring)."""
    if group_size % 8:
        raise ValueError(f"gpu_layout: the group size must be a multiple of 8, not {group_size}")
    n, w = qweight.shape[0], group_size // 8
    codes = unpack_uint8(qweight, 4, groups * group_size).reshape(n, groups, 8, w).permute(0, 1, 3, 2)
    pairs = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [N, G, W, 4]: the bytes of each word
    return pairs.contiguous().view(torch.int32).reshape(n, groups * w)
