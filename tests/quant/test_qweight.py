from __future__ import annotations

import pytest
import torch

from graphpress.quant.qweight import QuantizedWeight, QuantSpec
from graphpress.quant.rtn import quantize_rtn


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, "bits=3"),
        ({"bits": 2}, "bits=2"),
        ({"group_size": 7}, "group_size=7"),  # 4-bit codes of an odd group would split a byte
        ({"group_size": 1}, "group_size=1"),
        ({"group_size": 0}, "group_size=0"),
    ],
)
def test_spec_refuses(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_spec_is_frozen_and_counts_groups() -> None:
    s = QuantSpec(4, 128, False)
    with pytest.raises(AttributeError):
        s.bits = 8  # type: ignore[misc]
    assert (s.n_groups(576), s.padded_k(576)) == (5, 640)
    assert (QuantSpec(8, None).n_groups(576), QuantSpec(8, None).padded_k(576)) == (1, 576)


@pytest.mark.parametrize("w, match", [(torch.zeros(0, 64), "empty"), (torch.zeros(4, 0), "empty"),
                                      (torch.zeros(64), "2-D"), (torch.full((2, 32), torch.nan), "NaN"),
                                      (torch.tensor([[float("inf"), -float("inf")] * 16]), "inf")])
def test_refuses_bad_weights(w: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize_rtn(w, QuantSpec())


def test_format_validates_shapes() -> None:
    spec = QuantSpec(4, 32)
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(torch.zeros(2, 64, dtype=torch.uint8), torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.uint8),
                        spec, 64)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_padding_k576_group128(symmetric: bool, clip_search: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 576, generator=g)
    w[:, 512:] += 3.0  # the short last group lies far from 0: zero padding would show in its range
    spec = QuantSpec(4, 128, symmetric)
    q = quantize_rtn(w, spec, clip_search=clip_search)
    assert q.codes.shape == (24, 640) and q.scales.shape == (24, 5) and q.zeros.shape == (24, 5)
    # padding columns sit at their group's zero point: they dequantize to exactly 0
    assert torch.equal(q.codes[:, 576:], q.zeros[:, 4:5].expand(24, 64))
    assert q.dequantize().shape == (24, 576)
    # the last group's parameters are those of its 64 real columns quantized alone
    alone = quantize_rtn(w[:, 512:], QuantSpec(4, 64, symmetric), clip_search=clip_search)
    assert torch.equal(q.scales[:, 4:], alone.scales) and torch.equal(q.zeros[:, 4:], alone.zeros)
    assert torch.equal(q.dequantize()[:, 512:], alone.dequantize())


def test_symmetric_uses_midpoint_and_extreme_lands_on_lowest_code() -> None:
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0] * 4, [2.0, -0.5, 1.0, 0.0] * 4])  # [2, 16]
    q = quantize_rtn(w, QuantSpec(4, 16, True), clip_search=False)
    assert torch.equal(q.zeros, torch.full((2, 1), 8, dtype=torch.uint8))
    # row 0: extreme -1.0 -> code 0 with scale +1/8; row 1: extreme +2.0 -> code 0 with scale -2/8
    assert torch.allclose(q.scales, torch.tensor([[0.125], [-0.25]]))
    assert q.codes[0, 1] == 0 and q.codes[1, 0] == 0
    assert torch.equal(q.dequantize(), w)  # every entry here is on the grid


def test_all_zero_weight_is_exact() -> None:
    for spec in (QuantSpec(4, 32, False), QuantSpec(8, None, True)):
        q = quantize_rtn(torch.zeros(3, 64), spec)
        assert torch.equal(q.dequantize(), torch.zeros(3, 64))


def test_a_finite_weight_whose_sum_overflows_is_accepted() -> None:
    w = torch.full((4, 64), 3e38)  # the sum is inf, every entry finite
    assert quantize_rtn(w, QuantSpec(8, None, True), clip_search=False).dequantize().isfinite().all()
