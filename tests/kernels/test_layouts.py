"""The GPU kernels' weight layouts (pure tensor code: runs without a GPU)."""

from __future__ import annotations

import pytest
import torch

from graphpress.kernels.layouts import gpu_layout
from graphpress.kernels.quantized import unpack_uint8


@pytest.mark.parametrize("group", [64, 128])
def test_the_gpu_layout_holds_each_code_where_the_kernels_read_it(group: int) -> None:
    """Nibble i of word w of a group: column i * g/8 + w of the group; byte j: nibbles 2 (j % 4), 2 (j % 4) + 1
    of word j // 4 (what the tensor-core kernel's byte loads assume)."""
    g = torch.Generator().manual_seed(3)
    qweight = torch.randint(0, 256, (5, group), dtype=torch.uint8, generator=g)  # 2 groups
    codes = unpack_uint8(qweight, 4, 2 * group).reshape(5, 2, 8, group // 8)
    words = gpu_layout(qweight, 2, group)
    assert words.dtype == torch.int32 and words.shape == (5, 2 * group // 8)
    nibbles = words.view(torch.uint8).reshape(5, 2, group // 8, 4)
    for i in range(8):
        assert torch.equal((nibbles[..., i // 2] >> (4 * (i % 2))) & 15, codes[:, :, i])
    as_bytes = words.view(torch.uint8).reshape(5, 2, group // 2)
    j = torch.arange(group // 2)
    low = codes.permute(0, 1, 3, 2)[:, :, j // 4, 2 * (j % 4)]
    assert torch.equal(as_bytes & 15, low)


def test_a_group_size_the_words_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        gpu_layout(torch.zeros(2, 6, dtype=torch.uint8), 1, 12)


def test_kept_layouts_are_made_once_and_again_after_the_weight_changes() -> None:
    from graphpress.kernels.layouts import as_rows, kept

    w = torch.zeros(2, 3)
    calls = []
    make = lambda: calls.append(1) or w.sum().item()  # noqa: E731
    assert kept("test", w, make) == 0 and kept("test", w, make) == 0 and len(calls) == 1
    w.add_(1)  # modified in place: made again
    assert kept("test", w, make) == 6 and len(calls) == 2
    x = torch.randn(2, 3, 8)[..., ::2]  # no unit stride along K
    rows = as_rows(x)
    assert rows.shape == (6, 4) and rows.stride(-1) == 1 and torch.equal(rows, x.reshape(6, 4))
