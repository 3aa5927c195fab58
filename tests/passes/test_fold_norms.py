"""FoldNormScales: norm scales move into the consuming linears; refused where another reader sees the norm."""

from __future__ import annotations

import torch
from torch import nn

from graphpress import graph
from graphpress.capture import capture
from graphpress.graph import aten, is_op
from graphpress.metrics import max_rel_error
from graphpress.passes import PASSES
from graphpress.passes.fold_norms import FoldNormScales, fold_scale_into_linear
from graphpress.program import Program
from graphpress.runner import run_pipeline
from tests.conftest import capture_tiny

TIED = "lm_head weight is tied to model.embed_tokens.weight; folding would change the embedding"


def fresh_batch(program: Program) -> tuple[torch.Tensor, ...]:
    """A batch of another size than the example one, so dynamic shapes are exercised too."""
    g = torch.Generator().manual_seed(7)
    if program.kind == "module":
        x = program.example_inputs[0]
        return (torch.randn(3, *x.shape[1:], generator=g),)
    ids = torch.randint(0, 128, (3, 9), generator=g)
    return (ids,) if len(program.input_names) == 1 else (ids, torch.ones_like(ids))


def assert_same_outputs(ref: Program, out: Program) -> None:
    batch = fresh_batch(ref)
    assert max_rel_error(ref(*batch), out(*batch)) <= 1e-4


def scale_muls(program: Program) -> list[torch.fx.Node]:
    """Products of an activation with a parameter: the captured form of an RMSNorm scale."""
    return [
        n
        for n in program.gm.graph.nodes
        if is_op(n, aten.mul.Tensor) and any(graph.get_tensor(program.gm, a) is not None for a in n.args)
    ]


def fold(program: Program) -> tuple[Program, dict]:
    out, records = run_pipeline(program, [FoldNormScales()], verify=True)
    return out, records[0].stats


def test_registered() -> None:
    assert PASSES["fold_norm_scales"] is FoldNormScales


def test_fold_scale_into_linear_matches_affine_then_linear() -> None:
    g = torch.Generator().manual_seed(0)
    n, w, b = torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    gamma, beta = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    for bias, shift in ((b, beta), (None, beta), (b, None), (None, None)):
        new_w, new_b = fold_scale_into_linear(w, bias, gamma, shift)
        ref = nn.functional.linear(n * gamma + (shift if shift is not None else 0), w, bias)
        assert torch.allclose(nn.functional.linear(n, new_w, new_b), ref, atol=1e-5)
        assert (new_b is None) == (bias is None and shift is None)


def test_llama_tied_folds_every_layer_norm_and_keeps_the_final_one(llama: Program) -> None:
    assert len(scale_muls(llama)) == 5
    out, stats = fold(llama)
    assert stats == {"folded_norms": 4, "linears_updated": 10, "skipped": {"model.norm": TIED}}
    # only the final norm's product is left; the folded gammas are gone from the parameters
    assert [graph.get_tensor(out.gm, a) is not None for a in scale_muls(out)[0].args].count(True) == 1
    assert len(scale_muls(out)) == 1
    params = dict(out.gm.named_parameters())
    assert not [n for n in params if "layernorm" in n]
    assert "model.norm.weight" in params
    assert_same_outputs(llama, out)


def test_llama_untied_folds_final_norm_into_lm_head(llama_untied: Program) -> None:
    out, stats = fold(llama_untied)
    assert stats == {"folded_norms": 5, "linears_updated": 11, "skipped": {}}
    assert scale_muls(out) == []
    assert not [n for n, _ in out.gm.named_parameters() if "norm" in n]
    before = dict(llama_untied.gm.named_parameters())
    after = dict(out.gm.named_parameters())
    expected = before["lm_head.weight"] * before["model.norm.weight"][None, :]
    assert torch.allclose(after["lm_head.weight"], expected)
    assert_same_outputs(llama_untied, out)


def test_bert_post_ln_feeds_the_residual_and_is_refused() -> None:
    bert = capture_tiny("bert")
    out, stats = fold(bert)
    residual = "its output feeds {}, not only linears"
    assert stats == {
        "folded_norms": 0,
        "linears_updated": 0,
        "skipped": {
            "embeddings.LayerNorm": residual.format("add_6 (add.Tensor)"),
            "encoder.layer.0.attention.output.LayerNorm": residual.format("add_7 (add.Tensor)"),
            "encoder.layer.0.output.LayerNorm": residual.format("add_8 (add.Tensor)"),
            "encoder.layer.1.attention.output.LayerNorm": residual.format("add_9 (add.Tensor)"),
            "encoder.layer.1.output.LayerNorm": "its output is a graph output",
        },
    }
    norms = [n for n in out.gm.graph.nodes if is_op(n, aten.layer_norm.default)]
    assert len(norms) == 5 and all(n.args[2] is not None and n.args[3] is not None for n in norms)
    assert_same_outputs(bert, out)


def test_convnet_has_no_norm_to_fold() -> None:
    convnet = capture_tiny("convnet")
    out, stats = fold(convnet)
    assert stats == {"folded_norms": 0, "linears_updated": 0, "skipped": {}}
    assert_same_outputs(convnet, out)


class PreNorm(nn.Module):
    """LayerNorm and RMSNorm each read only by linears: q with bias, k without (the fold creates one)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.rms = nn.RMSNorm(16)
        self.q = nn.Linear(16, 8)
        self.k = nn.Linear(16, 8, bias=False)
        self.up = nn.Linear(16, 8)
        with torch.no_grad():
            for p in (self.ln.weight, self.rms.weight):
                p.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return self.q(h) * self.k(h) + self.up(self.rms(x))


def test_layer_norm_and_rms_norm_fold_with_shift() -> None:
    program = capture(PreNorm(), (torch.randn(2, 5, 16),), name="pre-norm")
    out, stats = fold(program)
    assert stats == {"folded_norms": 2, "linears_updated": 3, "skipped": {}}
    for n in out.gm.graph.nodes:
        if is_op(n, aten.layer_norm.default, aten.rms_norm.default):
            assert n.args[2] is None and (
                len(n.args) < 4 or n.args[3] is None or is_op(n, aten.rms_norm.default)
            )
    params = dict(out.gm.named_parameters())
    assert "k.bias" in params and not [n for n in params if n.startswith(("ln.", "rms."))]
    assert_same_outputs(program, out)


class Refusals(nn.Module):
    """Three norms the pass must leave alone, one reason each."""

    def __init__(self) -> None:
        super().__init__()
        self.residual_norm = nn.LayerNorm(16)
        self.shared_norm = nn.RMSNorm(16)
        self.gamma_norm = nn.RMSNorm(16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.residual_norm(x)
        h = h + self.a(h)  # the norm output is also the residual
        s = self.b(self.shared_norm(h)) + self.b(h)  # b's weight is read by two linears
        g = self.c(self.gamma_norm(s)) + self.gamma_norm.weight  # the gamma is read twice
        return g


def test_refuses_residual_shared_weight_and_shared_gamma() -> None:
    program = capture(Refusals(), (torch.randn(2, 16),), name="refusals")
    out, stats = fold(program)
    skipped = stats["skipped"]
    assert stats["folded_norms"] == 0 and set(skipped) == {"residual_norm", "shared_norm", "gamma_norm"}
    assert skipped["residual_norm"].startswith("its output feeds add")
    assert skipped["shared_norm"] == "b weight is read by 2 nodes; folding would change its other readers"
    assert skipped["gamma_norm"] == "its parameter gamma_norm.weight is also used elsewhere"
    assert_same_outputs(program, out)
