"""2:4 weights on sparse tensor cores (graphpress.kernels.sparse24): the pattern check, what is refused and why,
and on a GPU the compressed product against the fp32 product of the same dense weight with the same zeros."""

from __future__ import annotations

import pytest
import torch

from graphpress.kernels.sparse24 import compress, is_2_4, semi_structured, why_not
from graphpress.metrics import sqnr
from graphpress.passes.sparsify import KEY, Sparsify
from graphpress.runner import run_pipeline
from graphpress.sparsity import Pattern, magnitude
from tests.conftest import capture_tiny


def _sparse_2_4(n: int, k: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return w.masked_fill(magnitude(w, Pattern(n=2, m=4)), 0)


def _sparsified_tiny():  # noqa: ANN202
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randint(0, 128, (2, 32), generator=g),) for _ in range(2)]
    program, _ = run_pipeline(capture_tiny("llama"), [Sparsify(method="magnitude", pattern="2:4", roles=("block",))],
                              calibration=calib)
    return program


def test_the_pattern_check() -> None:
    w = _sparse_2_4(8, 16)
    assert is_2_4(w)
    w[0, 1:4] = 1.0  # three nonzeros in one group of four
    assert not is_2_4(w)
    assert not is_2_4(torch.zeros(4, 6))  # K not a multiple of 4


def test_refusals_say_why() -> None:
    assert "CUDA" in why_not(_sparse_2_4(64, 64))
    with pytest.raises(ValueError, match="move the program to a CUDA device"):
        compress(_sparse_2_4(64, 64))
    dense = capture_tiny("llama")
    with pytest.raises(ValueError, match="no 2:4 weight"):
        semi_structured(dense)
    program = _sparsified_tiny()  # on the CPU: nothing swapped, each weight says why
    program.gm.meta[KEY] = {**program.gm.meta[KEY], "gone.weight": "2:4"}  # as if a later pass replaced it
    found = semi_structured(program)
    assert found.pop("gone.weight") == "is not the weight of a linear in the program"
    assert len(found) == 14 and all("CUDA" in reason for reason in found.values())


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "n", "k"), [(1024, 4096, 4096), (64, 1536, 576)])
def test_compressed_product_matches_the_dense_one(m: int, n: int, k: int) -> None:
    w = _sparse_2_4(n, k).mul(0.05).to("cuda", torch.bfloat16)
    x = torch.randn(m, k, device="cuda").bfloat16()
    ref = x.float() @ w.float().T
    out = torch.nn.functional.linear(x, compress(w))
    assert out.shape == ref.shape and sqnr(ref, out.float()) >= 45


@pytest.mark.gpu
def test_a_sparsified_program_runs_on_sparse_tensor_cores() -> None:
    program = _sparsified_tiny()
    x = program.example_inputs[0]
    ref = program(x)
    program.to("cuda")
    with torch.autocast("cuda", torch.bfloat16):
        dense = program(x.cuda()).float().cpu()
        found = semi_structured(program)
        out = program(x.cuda()).float().cpu()
    # hidden 64 -> q/k/v/o/gate/up swap; down (K = 96) too: bf16 needs multiples of (32, 64) or (16, 16)
    assert all(r == "2:4" or "multiples" in r for r in found.values()), found
    assert sum(r == "2:4" for r in found.values()) >= 12, found
    assert sqnr(dense, out) >= 40 and sqnr(ref, out) >= 25
