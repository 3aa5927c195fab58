"""The quantized op family: references against the format's math, int8 products, and backward passes
against eager autograd of the same math."""

from __future__ import annotations

import pytest
import torch

from graphpress.kernels import REFERENCES
from graphpress.kernels.quantized import (
    dequantize,
    fake_quantize_reference,
    int8_weight,
    quantized_embedding_reference,
    quantized_linear_reference,
    w8a8_product,
)
from graphpress.kernels.rotary import rotary_embedding_reference
from graphpress.metrics import max_rel_error, sqnr
from graphpress.quant.int8 import (
    dynamic_quantize_linear,
    fake_quantize_rows,
    quantize_rows_uint8,
    symmetric_int8_rows,
)
from graphpress.quant.qweight import QuantSpec
from graphpress.quant.rtn import quantize_rtn

ops = torch.ops.graphpress

SPECS = [QuantSpec(4, 32, False), QuantSpec(4, 32, True), QuantSpec(8, 64, False), QuantSpec(4, None, False),
         QuantSpec(8, None, True), QuantSpec(4, 48, False)]  # 48: no power of two; a neutral format takes it


def _weight(n: int = 24, k: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def _args(spec: QuantSpec, n: int = 24, k: int = 100) -> tuple:
    q = quantize_rtn(_weight(n, k), spec)
    return (*q.packed(), k, spec.bits, q.group_len), q


def test_registered_references() -> None:
    assert REFERENCES[ops.quantized_linear.default] is quantized_linear_reference
    assert REFERENCES[ops.quantized_embedding.default] is quantized_embedding_reference


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_packed_tensors_stand_for_the_quantized_weight(spec: QuantSpec) -> None:
    (qweight, scales, zeros, k, bits, g), q = _args(spec)  # K = 100: the last group padded
    assert qweight.dtype == torch.uint8 and qweight.shape == (24, -(-q.spec.padded_k(k) * bits // 8))
    assert (zeros is None) == spec.symmetric
    assert torch.equal(dequantize(qweight, scales, zeros, k, bits, g), q.dequantize())


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
def test_linear_and_embedding_references(spec: QuantSpec) -> None:
    (qweight, scales, zeros, k, bits, g), q = _args(spec)
    w, x = q.dequantize(), torch.randn(3, 5, k)
    bias = torch.randn(24)
    assert torch.equal(quantized_linear_reference(x, qweight, scales, zeros, bias, k, bits, g),
                       torch.nn.functional.linear(x, w, bias))
    ids = torch.randint(0, 24, (2, 7))
    assert torch.equal(quantized_embedding_reference(qweight, scales, zeros, ids, bits, g, k), w[ids])


def test_w8a8_reference_multiplies_the_rounded_values_and_matches_the_int8_math() -> None:
    """The rounded activations times the int8 weight, summed in float (what a fake-quantized program computes,
    bit for bit); the integer sums of int8 kernels differ only by float rounding."""
    w = _weight(48, 256)
    q, s = symmetric_int8_rows(w)
    x = torch.randn(2, 9, 256) * torch.rand(2, 9, 1) * 4
    x[0, 0] = 0  # an all-zero token
    codes = (q.int() + 128).to(torch.uint8)
    bias = torch.randn(48)
    y = quantized_linear_reference(x, codes, s[:, None], None, bias, 256, 8, 256, 8)
    assert torch.equal(y, torch.nn.functional.linear(fake_quantize_rows(x), q.float() * s[:, None], bias))
    c, scale, zero, rows = quantize_rows_uint8(x)
    acc = (c.long() - zero.long()) @ q.long().T  # int64 accumulation
    torch.testing.assert_close(y, acc.float() * (scale * s) * rows[..., None] + bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[0, 0], bias)  # the zero token gives exactly the bias
    assert sqnr(x @ w.T + bias, y) >= 35.0  # two 8-bit roundings: measured 40 dB


def test_int8_weight_uses_8bit_codes_as_they_are_and_requantizes_the_rest() -> None:
    (qweight, scales, zeros, k, bits, g), q = _args(QuantSpec(8, None, True))
    codes, s = int8_weight(qweight, scales, zeros, k, bits, g)
    assert torch.equal(codes.float() * s[:, None], q.dequantize())  # exact: the stored codes
    (qweight, scales, zeros, k, bits, g), q = _args(QuantSpec(4, 32, False))
    codes, s = int8_weight(qweight, scales, zeros, k, bits, g)
    assert codes.abs().max() == 127 and 30 < sqnr(q.dequantize(), codes.float() * s[:, None]) < 60
    # the row scales are float16 values (a file stores them in half the bytes), never below max |w| / 127
    assert torch.equal(s.half().float(), s) and (s >= q.dequantize().abs().amax(1) / 127).all()


def test_up_to_float16_rounds_up_where_float16_holds_the_value_and_passes_the_gradient() -> None:
    from graphpress.kernels.quantized import up_to_float16

    x = torch.tensor([1.0, 1.0 + 2.0 ** -12, 0.1, 1e-6, 1e6, torch.inf], requires_grad=True)
    y = up_to_float16(x)
    assert y[0] == 1.0 and y[1] == 1.0 + 2.0 ** -10 and y[2] >= 0.1 and y[2] == y[2].half().float()
    assert torch.equal(y[3:], x[3:])  # below float16's normal numbers and past its range: unchanged
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(6))


def test_rows_are_quantized_each_on_its_own_range() -> None:
    x = torch.tensor([[1e-3, -2e-3, 0.5e-3], [100.0, -50.0, 25.0]])  # ranges 1e5 apart
    codes, scale, zero, rows = quantize_rows_uint8(x)
    back = (codes.float() - zero.float()) * scale * rows[:, None]
    assert max_rel_error(x[0], back[0]) <= 1 / 127 and max_rel_error(x[1], back[1]) <= 1 / 127
    c, _, z = dynamic_quantize_linear(x)  # one scale for the tensor would leave the small row at zero
    assert torch.equal(c[0], z.expand(3))


def test_float64_accumulation_is_exact_past_float32_integers() -> None:
    k = 2048  # |acc| ~ 127 * 127 * 2048 = 33M > 2^24: float32 would round partial sums
    q = torch.full((2, k), 127, dtype=torch.int8)
    q[1, ::2] = -127
    x = torch.ones(1, k)
    x[0, 1::2] = -1.0
    codes, scale, zero, rows = quantize_rows_uint8(x)
    acc = (codes.long() - zero.long()) @ q.long().T
    assert acc.abs().max() > 2**24 or acc.abs().min() == 0
    assert torch.equal(w8a8_product(x, q, torch.ones(2)), acc.float() * scale * rows[..., None])


def test_activation_bits_other_than_0_or_8_are_refused() -> None:
    (qweight, scales, zeros, k, bits, g), _ = _args(QuantSpec(4, 32, False))
    with pytest.raises(ValueError, match="activation_bits"):
        quantized_linear_reference(torch.randn(2, k), qweight, scales, zeros, None, k, bits, g, 4)


# --- gradients ------------------------------------------------------------------------------------------


def _eager_weight(codes: torch.Tensor, zp: torch.Tensor, scales: torch.Tensor, k: int, g: int) -> torch.Tensor:
    return ((codes - zp) * scales.repeat_interleave(g, dim=1))[:, :k]


@pytest.mark.parametrize("activation_bits", [0, 8])
def test_linear_backward_matches_eager_autograd(activation_bits: int) -> None:
    spec = QuantSpec(8 if activation_bits else 4, None if activation_bits else 32, bool(activation_bits))
    (qweight, scales, zeros, k, bits, g), q = _args(spec)
    x = torch.randn(3, 5, k, requires_grad=True)
    s = scales.clone().requires_grad_(True)
    bias = torch.randn(24, requires_grad=True)
    y = ops.quantized_linear(x, qweight, s, zeros, bias, k, bits, g, activation_bits)
    grad = torch.randn_like(y)
    gx, gs, gb = torch.autograd.grad(y, (x, s, bias), grad)

    x2, s2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, scales, bias))
    codes = q.codes.float()
    zp = q.zeros.float().repeat_interleave(g, dim=1)
    y2 = torch.nn.functional.linear(x2, _eager_weight(codes, zp, s2, k, g), b2)  # the float math (STE)
    ex, es, eb = torch.autograd.grad(y2, (x2, s2, b2), grad)
    assert torch.allclose(gx, ex, atol=1e-5) and torch.allclose(gb, eb, atol=1e-5)
    assert torch.allclose(gs, es, rtol=1e-4, atol=1e-3)


def test_embedding_backward_reaches_the_scales_of_the_gathered_rows() -> None:
    (qweight, scales, zeros, k, bits, g), q = _args(QuantSpec(4, 20, False))
    s = scales.clone().requires_grad_(True)
    ids = torch.tensor([[0, 3, 3], [5, 0, 1]])
    y = ops.quantized_embedding(qweight, s, zeros, ids, bits, g, k)
    grad = torch.randn_like(y)
    (gs,) = torch.autograd.grad(y, (s,), grad)
    s2 = scales.clone().requires_grad_(True)
    zp = q.zeros.float().repeat_interleave(g, dim=1)
    (es,) = torch.autograd.grad(_eager_weight(q.codes.float(), zp, s2, k, g)[ids], (s2,), grad)
    assert torch.allclose(gs, es, atol=1e-5) and gs[2].abs().sum() == 0  # row 2 is never gathered


def test_fake_quantize_is_the_grid_with_straight_through_and_lsq_gradients() -> None:
    spec = QuantSpec(4, 32, False)
    w = _weight()
    q = quantize_rtn(w, spec)
    scales = q.scales * 0.8  # a grid narrower than w: some weights fall outside and clamp
    zeros = q.zeros.float()
    out = fake_quantize_reference(w, scales, zeros, 4, 32)
    assert sqnr(w, out) > 10 and out.shape == w.shape
    w1, s1 = w.clone().requires_grad_(True), scales.clone().requires_grad_(True)
    y = ops.fake_quantize(w1, s1, zeros, 4, 32)
    assert torch.equal(y, out)
    grad = torch.randn_like(y)
    gw, gs = torch.autograd.grad(y, (w1, s1), grad)

    w2, s2 = w.clone().requires_grad_(True), scales.clone().requires_grad_(True)
    pad = 128 - 100
    v = torch.nn.functional.pad(w2, (0, pad)).reshape(24, 4, 32) / s2[..., None]
    r = v + (torch.round(v) - v).detach()  # straight-through rounding
    c = (r + zeros[..., None]).clamp(0, 15)
    y2 = ((c - zeros[..., None]) * s2[..., None]).reshape(24, -1)[:, :100]
    ew, es = torch.autograd.grad(y2, (w2, s2), grad)
    es = es / (15 * 32) ** 0.5  # LSQ's gradient scale: 1 / sqrt(g * (2^bits - 1))
    assert torch.equal(gw == 0, ew == 0) and (gw == 0).any()  # clamped weights get no gradient
    assert torch.allclose(gw, ew, rtol=1e-6, atol=0)  # inside: grad * s / s in eager, grad here
    assert torch.allclose(gs, es, rtol=1e-4, atol=1e-5)


def test_rotary_backward_matches_eager_autograd() -> None:
    x = torch.randn(2, 4, 6, 8, requires_grad=True)
    angles = torch.randn(1, 1, 6, 4)
    cos = torch.cat([angles.cos()] * 2, -1).requires_grad_(True)
    sin = torch.cat([angles.sin()] * 2, -1).requires_grad_(True)
    y = ops.rotary_embedding(x, cos, sin)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, cos, sin), grad)
    x2, c2, s2 = (t.detach().clone().requires_grad_(True) for t in (x, cos, sin))
    want = torch.autograd.grad(rotary_embedding_reference(x2, c2, s2), (x2, c2, s2), grad)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
