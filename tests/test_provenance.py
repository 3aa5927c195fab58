"""Provenance: records compose back to the original tensors; unmerge cuts merged weights back into them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from graphpress import graph
from graphpress.passes.merge_siblings import MergeSiblingLinears
from graphpress.program import Program
from graphpress.provenance import KEY, Piece, record, sources_of, unmerge
from graphpress.runner import run_pipeline
from tests.conftest import capture_tiny


def _module(**tensors: torch.Tensor) -> fx.GraphModule:
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    for name, t in tensors.items():
        graph.set_tensor(gm, name.replace("__", "."), t)
    return gm


def test_chains_compose_back_to_the_originals() -> None:
    gm = _module()
    record(gm, "a.qkv.weight", [Piece("a.q.weight", 0, 0, 4), Piece("a.k.weight", 0, 4, 6)])
    record(gm, "a.qkv.qweight", [Piece("a.qkv.weight")])  # quantized from the merged weight, layout kept
    record(gm, "big.weight", [Piece("a.other.weight", 0, 0, 3), Piece("a.qkv.qweight", 0, 3, 9)])
    assert sources_of(gm, "a.qkv.qweight") == [Piece("a.q.weight", 0, 0, 4), Piece("a.k.weight", 0, 4, 6)]
    assert sources_of(gm, "big.weight") == [
        Piece("a.other.weight", 0, 0, 3), Piece("a.q.weight", 0, 3, 7), Piece("a.k.weight", 0, 7, 9)]
    assert sources_of(gm, "a.q.weight") == []  # an original has no record
    assert gm.meta[KEY]["a.qkv.weight"][1] == {"source": "a.k.weight", "dim": 0, "start": 4, "stop": 6}


@pytest.mark.parametrize(("target", "pieces", "error"), [
    ("w", [Piece("w", 0, 0, 2)], "w: a tensor cannot be its own source"),
    ("w", [Piece("a", 0, 0, 3), Piece("b", 0, 2, 4)], "w: the slices of a and b overlap along dim 0"),
    ("w", [Piece("a", 0, 0, 3), Piece("b", 0, 3, 9)], r"w: the slice of b, \[3, 9\) along dim 0, lies outside "
                                                     r"its shape \[6, 2\]"),
    ("qkv", [Piece("x", 0, 0, 6)], "qkv: that name is already the source of merged"),
])
def test_record_refuses(target: str, pieces: list[Piece], error: str) -> None:
    gm = _module(w=torch.zeros(6, 2))
    record(gm, "merged", [Piece("qkv")])
    with pytest.raises(ValueError, match=error):
        record(gm, target, pieces)
    assert list(gm.meta[KEY]) == ["merged"]  # a refused record leaves the table as it was


def test_piece_needs_the_whole_slice() -> None:
    with pytest.raises(ValueError, match="give dim, start and stop together"):
        Piece("a", 0, 0)
    with pytest.raises(ValueError, match=r"0 <= start < stop, got dim=0, \[3, 3\)"):
        Piece("a", 0, 3, 3)


def test_slices_along_two_dimensions_are_refused_when_composed() -> None:
    gm = _module()
    record(gm, "qkv", [Piece("q", 0, 0, 4), Piece("k", 0, 4, 6)])
    record(gm, "wide", [Piece("qkv", 1, 0, 8), Piece("other", 1, 8, 9)])
    with pytest.raises(ValueError, match="of wide: q is sliced along dim 0 inside qkv, which is sliced along dim 1"):
        sources_of(gm, "wide")


def _originals(program: Program) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in program.gm.named_parameters()}


MERGED = [f"model.layers.{i}.{m}" for i in (0, 1) for m in
          ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight")]


def test_unmerge_gives_back_qkv_and_gate_up(llama: Program) -> None:
    before = _originals(llama)
    out, _ = run_pipeline(llama, [MergeSiblingLinears()], verify=False)
    unmerged = unmerge(out)
    assert sorted(unmerged) == sorted(MERGED)
    for name, t in unmerged.items():
        assert torch.equal(t, before[name]), name
    # copies, not views: editing them leaves the program alone
    merged = out.gm.get_parameter("model.layers.0.self_attn.q_proj_k_proj_v_proj.weight")
    unmerged["model.layers.0.self_attn.q_proj.weight"].zero_()
    assert merged[:64].abs().sum() > 0


def test_unmerge_gives_back_biases_only_of_members_that_had_one() -> None:
    bert = capture_tiny("bert")
    before = _originals(bert)
    out, _ = run_pipeline(bert, [MergeSiblingLinears()], verify=False)
    unmerged = unmerge(out)
    biases = [n for n in unmerged if n.endswith(".bias")]
    assert len(biases) == 6 and all(torch.equal(unmerged[n], before[n]) for n in unmerged)

    class NoBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), self.b(x)], -1)

    from graphpress.capture import capture

    out, _ = run_pipeline(capture(NoBias(), (torch.randn(2, 8),)), [MergeSiblingLinears()], verify=False)
    assert out.gm.meta[KEY]["a_b.bias"] == [{"source": "a.bias", "dim": 0, "start": 0, "stop": 4}]
    assert sorted(unmerge(out)) == ["a.bias", "a.weight", "b.weight"]


def test_unmerge_refuses_a_quantized_tensor_by_name(llama: Program) -> None:
    out, _ = run_pipeline(llama, [MergeSiblingLinears()], verify=False)
    merged = "model.layers.1.mlp.gate_proj_up_proj.weight"
    codes = out.gm.get_parameter(merged).detach().to(torch.int8)
    graph.set_tensor(out.gm, "model.layers.1.mlp.gate_proj_up_proj.qweight", codes, buffer=True)
    graph.delete_tensor(out.gm, merged)
    record(out.gm, "model.layers.1.mlp.gate_proj_up_proj.qweight", [Piece(merged)])
    assert sources_of(out.gm, "model.layers.1.mlp.gate_proj_up_proj.qweight")[1] == Piece(
        "model.layers.1.mlp.up_proj.weight", 0, 96, 192)
    with pytest.raises(ValueError, match=r"^unmerge tiny-llama: model.layers.1.mlp.gate_proj_up_proj.qweight is "
                                         r"torch.int8, not float; cannot cut model.layers.1.mlp.gate_proj.weight"):
        unmerge(out)


def test_record_survives_clone_and_deepcopy_independently(llama: Program) -> None:
    out, _ = run_pipeline(llama, [MergeSiblingLinears()], verify=False)
    table = copy.deepcopy(out.gm.meta[KEY])
    clone = out.clone()
    assert clone.gm.meta[KEY] == table and clone.gm.meta[KEY] is not out.gm.meta[KEY]
    record(clone.gm, "extra", [Piece("model.norm.weight")])
    assert "extra" not in out.gm.meta[KEY]
    assert copy.deepcopy(out.gm).meta[KEY] == table
    assert sorted(unmerge(clone)) == sorted(MERGED)


def test_quantized_tensors_point_back_at_the_weights_before_the_merge() -> None:
    from graphpress.passes.merge_siblings import MergeSiblingLinears
    from graphpress.passes.quantize_embedding import QuantizeEmbedding
    from graphpress.passes.weight_only import QuantizeRTN
    from graphpress.runner import run_pipeline
    from tests.conftest import capture_tiny

    out, _ = run_pipeline(capture_tiny("llama"), [MergeSiblingLinears(), QuantizeRTN(bits=4, roles=("block",)),
                                                  QuantizeEmbedding()])
    qkv = sources_of(out.gm, "model.layers.0.self_attn.q_proj_k_proj_v_proj.qweight")
    assert [p.source for p in qkv] == [f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkv"]
    table = sources_of(out.gm, "model.embed_tokens.qweight")
    assert [p.source for p in table] in (["lm_head.weight"], ["model.embed_tokens.weight"])


def test_a_transposed_copy_composes_and_unmerges_back() -> None:
    gm = _module()
    record(gm, "c.linear_weight", [Piece("c.weight", transposed=True)])  # [N, K] from a Conv1D's [K, N]
    record(gm, "c.qweight", [Piece("c.linear_weight")])
    record(gm, "cat.weight", [Piece("c.linear_weight", 1, 0, 4)])
    assert sources_of(gm, "c.qweight") == [Piece("c.weight", transposed=True)]
    assert sources_of(gm, "cat.weight") == [Piece("c.weight", 1, 0, 4, transposed=True)]
    record(gm, "d.t", [Piece("d.w", 0, 2, 5)])  # a slice of d.w, then transposed whole
    record(gm, "d.tt", [Piece("d.t", transposed=True)])
    assert sources_of(gm, "d.tt") == [Piece("d.w", 1, 2, 5, transposed=True)]
    assert gm.meta[KEY]["c.linear_weight"] == [{"source": "c.weight", "transposed": True}]


def test_gpt2_conv1d_weights_made_linear_unmerge_to_the_originals() -> None:
    from graphpress.capture import capture
    from graphpress.passes.linearize import LinearizeMatmuls
    from tests.hf_tiny import tiny_model

    model = tiny_model("gpt2")
    program = capture(model, {"input_ids": torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))})
    before = {n: t.detach().clone() for n, t in program.gm.named_parameters()}
    out, records = run_pipeline(program, [LinearizeMatmuls()])
    assert records[0].stats["linearized"] >= 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    back = unmerge(out)
    conv = [n for n in before if n.endswith(("c_attn.weight", "c_fc.weight"))]
    assert conv and all(torch.equal(back[n], before[n]) for n in conv)
