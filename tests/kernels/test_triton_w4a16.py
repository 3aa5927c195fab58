"""The W4A16 Triton kernel against the op's reference computed in fp32 from the same quantized weights
(issue bar: SQNR >= 45 dB; bf16 output rounding alone costs ~59 dB). GPU only."""

from __future__ import annotations

import pytest
import torch

from graphpress.kernels.quantized import dequantize
from graphpress.metrics import sqnr
from graphpress.quant.qweight import QuantSpec
from graphpress.quant.rtn import quantize_rtn
from tests.kernels.cuda_graphs import replays_like_eager

pytestmark = pytest.mark.gpu


def _case(m: int, n: int, k: int, group: int, symmetric: bool, bias: bool, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q = quantize_rtn(w, QuantSpec(4, group, symmetric))
    qweight, scales, zeros = q.packed()
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    ref = torch.nn.functional.linear(x.double(), dequantize(qweight, scales, zeros, k, 4, group).double(),
                                     b.double() if b is not None else None)
    cuda = [t.cuda() if t is not None else None for t in (x.to(dtype), qweight, scales, zeros, b)]
    return cuda, ref


@pytest.mark.parametrize(("m", "n", "k", "group", "symmetric", "bias"), [
    (1, 4096, 4096, 128, False, False),
    (3, 1000, 4000, 128, False, True),  # N off the tiles, K padded inside its last group
    (16, 6144, 4096, 128, True, False),
    (100, 512, 1536, 64, False, True),
    (256, 4096, 11008, 128, False, False),  # 11008 = 86 groups of 128
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_kernels_match_the_reference(m, n, k, group, symmetric, bias, dtype) -> None:  # noqa: ANN001
    from graphpress.kernels.triton_w4a16 import candidates, launch, w4a16_linear

    (x, qweight, scales, zeros, b), ref = _case(m, n, k, group, symmetric, bias, dtype, seed=m + n)
    every = candidates(m, group)
    for config in every[::5] + every[-1:]:  # a sample of what the tuner may pick: both kernels, with split-K
        out = launch(config, x, qweight, scales, zeros, b, k, group)
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.isfinite(out).all()
        assert sqnr(ref.float(), out.float().cpu()) >= 45, config
    if m == 1:  # leading dims, through the tuner
        out = w4a16_linear(x[None], qweight, scales, zeros, b, k, group)
        assert out.shape == (1, 1, n) and sqnr(ref.float(), out[0].float().cpu()) >= 45


def test_the_op_runs_the_kernel_on_cuda_and_under_cuda_graphs() -> None:
    from graphpress.kernels import triton_w4a16

    (x, qweight, scales, zeros, b), ref = _case(4, 2048, 2048, 128, False, True, torch.bfloat16, seed=7)
    args = (qweight, scales, zeros, b, 2048, 4, 128)
    out = torch.ops.graphpress.quantized_linear(x, *args)  # tunes this shape: before the capture
    assert any(key[1:3] == (2048, 2048) for key in triton_w4a16.TUNER.chosen)
    assert sqnr(ref.float(), out.float().cpu()) >= 45
    captured = replays_like_eager(x, args)
    compiled = torch.compile(lambda t: torch.ops.graphpress.quantized_linear(t, *args), mode="reduce-overhead")
    for _ in range(3):
        torch.testing.assert_close(compiled(x), captured)


def test_calls_the_kernel_does_not_cover_fall_back_to_the_reference() -> None:
    from graphpress.kernels.quantized import quantized_linear_reference

    g = torch.Generator().manual_seed(1)
    q = quantize_rtn(torch.randn(64, 96, generator=g), QuantSpec(8, 32, True))  # 8 bits, groups of 32
    qweight, scales, zeros = q.packed()
    x = torch.randn(2, 96, generator=g)
    got = torch.ops.graphpress.quantized_linear(x.cuda(), qweight.cuda(), scales.cuda(), None, None, 96, 8, 32)
    torch.testing.assert_close(got.cpu(), quantized_linear_reference(x, qweight, scales, zeros, None, 96, 8, 32))
