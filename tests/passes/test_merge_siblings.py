"""MergeSiblingLinears: linears on one input become one linear and a split; refused for lone, tied, mixed dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from graphpress.capture import capture
from graphpress.graph import aten, is_op
from graphpress.metrics import max_rel_error
from graphpress.passes import PASSES
from graphpress.passes.fold_norms import FoldNormScales
from graphpress.passes.merge_siblings import MergeSiblingLinears, concat_linears, merged_name
from graphpress.program import Program
from graphpress.provenance import KEY, Piece, sources_of
from graphpress.runner import run_pipeline
from tests.conftest import capture_tiny


def fresh_batch(program: Program) -> tuple[torch.Tensor, ...]:
    """A batch of another size than the example one, so dynamic shapes are exercised too."""
    g = torch.Generator().manual_seed(7)
    if program.kind == "module":
        return tuple(
            torch.randn(3, *x.shape[1:], generator=g, dtype=x.dtype)
            if x.is_floating_point()
            else torch.randint(0, 10, (3, *x.shape[1:]), generator=g)
            for x in program.example_inputs
        )
    ids = torch.randint(0, 128, (3, 9), generator=g)
    return (ids,) if len(program.input_names) == 1 else (ids, torch.ones_like(ids))


def assert_same_outputs(ref: Program, out: Program) -> None:
    batch = fresh_batch(ref)
    assert max_rel_error(ref(*batch), out(*batch)) <= 1e-4


def linears(program: Program) -> list[torch.fx.Node]:
    return [n for n in program.gm.graph.nodes if is_op(n, aten.linear.default)]


def merge(program: Program, zero_bias: int = 0, **options: int) -> tuple[Program, dict]:
    out, records = run_pipeline(program, [MergeSiblingLinears(**options)], verify=True)
    # the members' own copies are gone: only zero biases for bias-less members are new
    assert records[0].params_after == records[0].params_before + zero_bias
    return out, records[0].stats


def test_registered() -> None:
    assert PASSES["merge_sibling_linears"] is MergeSiblingLinears
    with pytest.raises(ValueError, match="min_group"):
        MergeSiblingLinears(min_group=1)


def test_concat_linears_and_name() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    ws = [torch.randn(n, 8, generator=g) for n in (4, 2, 3)]
    bs = [torch.randn(4, generator=g), None, torch.randn(3, generator=g)]
    w, b = concat_linears(ws, bs)
    assert w.shape == (9, 8) and b is not None and torch.equal(b[4:6], torch.zeros(2))
    ref = torch.cat([nn.functional.linear(x, wi, bi) for wi, bi in zip(ws, bs, strict=True)], dim=-1)
    assert torch.allclose(nn.functional.linear(x, w, b), ref, atol=1e-6)
    assert concat_linears(ws, [None] * 3)[1] is None
    assert merged_name(["m.l.0.attn.q_proj", "m.l.0.attn.k_proj"]) == "m.l.0.attn.q_proj_k_proj"
    assert merged_name(["m.a.proj", "m.b.proj"]) == "m.a_proj_b_proj"
    assert merged_name(["a", "b"]) == "a_b"


SINGLES = {
    "model.layers.0.self_attn.o_proj": "single linear reading reshape_3",
    "model.layers.0.mlp.down_proj": "single linear reading mul_19",
    "model.layers.1.self_attn.o_proj": "single linear reading reshape_7",
    "model.layers.1.mlp.down_proj": "single linear reading mul_28",
    "lm_head": "single linear reading slice_21",
}


@pytest.mark.parametrize("tied", [True, False])
def test_llama_merges_qkv_and_gate_up(tied: bool, llama: Program, llama_untied: Program) -> None:
    program = llama if tied else llama_untied
    out, stats = merge(program)
    assert stats == {"groups": 4, "linears_merged": 10, "skipped": SINGLES}
    assert len(linears(program)) == 15 and len(linears(out)) == 9
    params = {n: p.shape for n, p in out.gm.named_parameters()}
    assert params["model.layers.0.self_attn.q_proj_k_proj_v_proj.weight"] == (128, 64)  # q 64 + k 32 + v 32
    assert params["model.layers.1.mlp.gate_proj_up_proj.weight"] == (192, 64)
    assert not [n for n in params if n.endswith(("q_proj.weight", "gate_proj.weight"))]
    # every new node carries meta the exporter and later passes read, with the dynamic dims kept
    for n in out.gm.graph.nodes:
        if is_op(n, aten.split_with_sizes.default):
            (merged,) = n.all_input_nodes
            assert [tuple(p.shape[-1:]) for p in n.meta["val"]] in ([(64,), (32,), (32,)], [(96,), (96,)])
            assert not isinstance(merged.meta["val"].shape[0], int)  # symbolic batch
            assert all("val" in u.meta for u in n.users)
    assert_same_outputs(program, out)


def test_bert_merges_qkv_with_biases() -> None:
    bert = capture_tiny("bert")
    out, stats = merge(bert)
    assert stats["groups"] == 2 and stats["linears_merged"] == 6 and len(stats["skipped"]) == 6
    params = dict(out.gm.named_parameters())
    assert params["encoder.layer.1.attention.self.query_key_value.bias"].shape == (192,)
    assert_same_outputs(bert, out)


def test_convnet_has_no_siblings() -> None:
    convnet = capture_tiny("convnet")
    out, stats = merge(convnet)
    assert stats == {
        "groups": 0,
        "linears_merged": 0,
        "skipped": {"fc": "single linear reading flatten", "head": "single linear reading relu_2"},
    }
    assert_same_outputs(convnet, out)


def test_min_group_keeps_pairs(llama: Program) -> None:
    out, stats = merge(llama, min_group=3)
    assert stats["groups"] == 2 and stats["linears_merged"] == 6
    assert (
        stats["skipped"]["model.layers.0.mlp.gate_proj"] == "2 sibling(s) on mul_18, fewer than min_group=3"
    )
    assert_same_outputs(llama, out)


class Siblings(nn.Module):
    """Readers of one input: a, b (b without bias) and c merge; e is tied to the embedding; d, f read it
    in float64 (d, f merge with each other only); g reads another input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 3, bias=False)
        self.c = nn.Linear(8, 5)
        self.e = nn.Linear(8, 10, bias=False)
        self.e.weight = self.emb.weight  # [10, 8]: the same tensor
        self.d = nn.Linear(8, 2).double()
        self.f = nn.Linear(8, 6).double()
        self.g = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        xd = x.double()
        mixed = torch.cat([self.d(xd), self.f(xd)], -1).float().sum(-1, keepdim=True)
        out = torch.cat([self.a(x), self.b(x), self.c(x), self.e(x), self.g(self.emb(ids)), mixed], -1)
        return out


def test_refuses_tied_single_and_other_dtype() -> None:
    x = torch.randn(2, 8)
    ids = torch.randint(0, 10, (2,))
    program = capture(Siblings(), (x, ids), name="siblings")
    out, stats = merge(program, zero_bias=3)  # b: [3, 8], no bias
    assert stats["groups"] == 2 and stats["linears_merged"] == 5
    assert stats["skipped"] == {
        "e": "its weight is tied to emb.weight; merging would drop or duplicate it",
        "g": "single linear reading embedding",
    }
    params = dict(out.gm.named_parameters())
    assert params["a_b_c.weight"].shape == (12, 8) and params["a_b_c.bias"].shape == (12,)
    assert params["d_f.weight"].dtype == torch.float64
    # which rows came from which member: b has no bias, so its rows of the merged bias have no source
    assert sources_of(out.gm, "a_b_c.weight") == [Piece("a.weight", 0, 0, 4), Piece("b.weight", 0, 4, 7),
                                                   Piece("c.weight", 0, 7, 12)]
    assert sources_of(out.gm, "a_b_c.bias") == [Piece("a.bias", 0, 0, 4), Piece("c.bias", 0, 7, 12)]
    assert sorted(out.gm.meta[KEY]) == ["a_b_c.bias", "a_b_c.weight", "d_f.bias", "d_f.weight"]
    assert_same_outputs(program, out)


class MixedDtypes(nn.Module):
    """Two readers of x, one in float32 and one through a float64 cast: different dtypes never merge."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x.double()).float()


def test_refuses_siblings_in_another_dtype() -> None:
    program = capture(MixedDtypes(), (torch.randn(2, 8),), name="mixed-dtypes")
    out, stats = merge(program)
    assert stats["groups"] == 0
    assert stats["skipped"] == {
        "a": "its siblings on x differ in dtype or K: b (torch.float64 input, torch.float64 weight)",
        "b": "its siblings on x differ in dtype or K: a (torch.float32 input, torch.float32 weight)",
    }
    assert len(linears(out)) == 2


def test_fold_then_merge_exports_to_onnx(llama_untied: Program, tmp_path: Path) -> None:
    import onnxruntime as ort

    out, records = run_pipeline(llama_untied, [FoldNormScales(), MergeSiblingLinears()], verify=True)
    assert [r.stats["folded_norms" if i == 0 else "groups"] for i, r in enumerate(records)] == [5, 4]
    out.gm.eval()  # the captured graph has no train-mode ops left; this only quiets the exporter
    onnx_program = torch.onnx.export(
        out.gm, out.example_inputs, dynamo=True, dynamic_shapes=out.torch_dynamic_shapes()
    )
    path = tmp_path / "model.onnx"
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ids,) = fresh_batch(out)
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    assert max_rel_error(llama_untied(ids), torch.from_numpy(logits)) <= 1e-4
