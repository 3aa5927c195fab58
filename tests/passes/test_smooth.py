"""apply_input_scale folds 1/s into each kind of producer exactly; AWQ and SmoothQuant streamed and verified."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from graphpress import graph
from graphpress.capture import capture
from graphpress.graph import aten, is_op
from graphpress.metrics import max_rel_error, sqnr
from graphpress.passes import PASSES
from graphpress.passes.fold_norms import FoldNormScales
from graphpress.passes.smooth import AWQ, SmoothQuant, apply_input_scale, check_input_scale
from graphpress.passes.weight_only import QuantizeRTN
from graphpress.program import Program
from graphpress.runner import PipelineError, run_pipeline
from tests.conftest import capture_tiny, tiny_llama

OUTLIERS = [3, 17, 40]  # hidden channels made loud in outlier_llama


def outlier_llama(factor: float = 20.0) -> Program:
    """tiny_llama with a few norm-scale channels times ``factor`` and the reading columns divided by it.

    The float function is unchanged (up to rounding), but q/k/v and gate/up now see activation outliers in
    those channels, and their weights have tiny columns there: the case AWQ and SmoothQuant are for.
    """
    m = tiny_llama()
    with torch.no_grad():
        for layer in m.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, linears in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[OUTLIERS] *= factor
                for lin in linears:
                    lin.weight[:, OUTLIERS] /= factor
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return capture(m, {"input_ids": ids}, name="outlier-llama")


def calibration(n: int = 6, seed: int = 3, length: int = 32) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (2, length), generator=g),) for _ in range(n)]


def fresh_batch(program: Program) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    if program.kind == "module":
        return (torch.randn(3, 5, program.example_inputs[0].shape[-1], generator=g),)
    ids = torch.randint(0, 128, (3, 9), generator=g)
    return (ids,) if len(program.input_names) == 1 else (ids, torch.ones_like(ids))


def linears_of(program: Program, *modules: str) -> list[fx.Node]:
    """The linear nodes whose weight is ``<module>.weight``, in the order given."""
    by_module = {graph.module_name(n.args[1].target): n for n in program.gm.graph.nodes
                 if is_op(n, aten.linear.default) and n.args[1].op == "get_attr"}
    return [by_module[m] for m in modules]


def random_scale(k: int, seed: int = 0) -> torch.Tensor:
    """Log-uniform in [0.1, 10]: far enough from 1 that a wrong fold shows."""
    return torch.exp((torch.rand(k, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * 2.3)


def scaled(program: Program, *modules: str) -> tuple[Program, str, torch.Tensor]:
    """A copy of ``program`` with a random s applied to the group of ``modules``; checks exactness."""
    out = program.clone()
    group = linears_of(out, *modules)
    s = random_scale(graph.get_tensor(out.gm, group[0].args[1]).shape[1])
    where = apply_input_scale(out.gm, group, s)
    out.gm.graph.lint()
    out.gm.recompile()
    batch = fresh_batch(program)
    assert max_rel_error(program(*batch), out(*batch)) <= 1e-5
    for n in group:  # the weights carry s on their columns
        before = graph.get_tensor(program.gm, linears_of(program, graph.module_name(n.args[1].target))[0].args[1])
        assert torch.allclose(graph.get_tensor(out.gm, n.args[1]), before * s, rtol=1e-6)
    return out, where, s


def params(program: Program) -> dict[str, torch.Tensor]:
    return dict(program.gm.named_parameters())


def inserted_muls(program: Program) -> list[fx.Node]:
    return [n for n in program.gm.graph.nodes if is_op(n, aten.mul.Tensor)
            and any(isinstance(a, fx.Node) and a.op == "get_attr" and a.target.endswith("input_scale") for a in n.args)]


@pytest.fixture(scope="module")
def llama() -> Program:
    return capture_tiny("llama")


def test_registered() -> None:
    assert PASSES["awq"] is AWQ and PASSES["smoothquant"] is SmoothQuant


# --- apply_input_scale, one producer kind at a time -------------------------------------------------------


def test_rmsnorm_scale_absorbs_for_qkv(llama: Program) -> None:
    attn = "model.layers.0.self_attn."
    out, where, s = scaled(llama, attn + "q_proj", attn + "k_proj", attn + "v_proj")
    assert where == "norm" and not inserted_muls(out)
    gamma = "model.layers.0.input_layernorm.weight"
    assert torch.allclose(params(out)[gamma], params(llama)[gamma] / s, rtol=1e-6)


def test_swiglu_up_proj_rows_absorb_for_down_proj(llama: Program) -> None:
    out, where, s = scaled(llama, "model.layers.1.mlp.down_proj")
    assert where == "linear" and not inserted_muls(out)
    up = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(params(out)[up], params(llama)[up] / s[:, None], rtol=1e-6)
    gate = "model.layers.1.mlp.gate_proj.weight"
    assert torch.equal(params(out)[gate], params(llama)[gate])


def test_after_attention_a_mul_is_inserted(llama: Program) -> None:
    out, where, s = scaled(llama, "model.layers.0.self_attn.o_proj")
    assert where == "inserted"
    (mul,) = inserted_muls(out)
    assert isinstance(mul.meta["val"], torch.Tensor) and mul.meta["val"].shape[-1] == 64
    assert "model.layers.0" in str(mul.meta["nn_module_stack"])  # stays inside its block for calibration
    assert torch.allclose(params(out)["model.layers.0.self_attn.o_proj.input_scale"], 1 / s)


def test_part_of_a_group_or_a_scale_free_norm_gets_a_mul(llama: Program) -> None:
    # k/v also read the norm: scaling gamma for q alone would change them
    out, where, _ = scaled(llama, "model.layers.0.self_attn.q_proj")
    assert where == "inserted" and len(inserted_muls(out)) == 1
    assert torch.equal(params(out)["model.layers.0.input_layernorm.weight"],
                       params(llama)["model.layers.0.input_layernorm.weight"])
    folded, _ = run_pipeline(llama, [FoldNormScales()])
    attn = "model.layers.0.self_attn."
    _, where, _ = scaled(folded, attn + "q_proj", attn + "k_proj", attn + "v_proj")
    assert where == "inserted"


def test_bert_layernorm_feeding_the_residual_is_left_alone() -> None:
    bert = capture_tiny("bert")
    attn = "encoder.layer.0.attention.self."
    out, where, _ = scaled(bert, attn + "query", attn + "key", attn + "value")
    assert where == "inserted"
    for name in ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"):
        assert torch.equal(params(out)[name], params(bert)[name])


class _Chain(nn.Module):
    """LayerNorm -> up, up -> mid -> down (linear straight into linear), relu -> out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(16)
        self.up, self.mid, self.down, self.out = nn.Linear(16, 24), nn.Linear(24, 12), nn.Linear(12, 12), nn.Linear(12, 8)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.down(self.mid(self.up(self.ln(x))))))


@pytest.fixture(scope="module")
def chain() -> Program:
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    return capture(_Chain().eval(), (x,), dynamic_dims=[{0: "batch", 1: "seq"}], name="chain")


def test_layernorm_weight_and_bias_absorb(chain: Program) -> None:
    out, where, s = scaled(chain, "up")
    assert where == "norm" and not inserted_muls(out)
    for name in ("ln.weight", "ln.bias"):
        assert torch.allclose(params(out)[name], params(chain)[name] / s, rtol=1e-6)


def test_producing_linear_rows_and_bias_absorb(chain: Program) -> None:
    out, where, s = scaled(chain, "down")
    assert where == "linear"
    assert torch.allclose(params(out)["mid.weight"], params(chain)["mid.weight"] / s[:, None], rtol=1e-6)
    assert torch.allclose(params(out)["mid.bias"], params(chain)["mid.bias"] / s, rtol=1e-6)
    _, where, _ = scaled(chain, "out")  # behind relu: no parameter to divide, so a mul
    assert where == "inserted"


def test_check_refuses_what_the_rewrite_cannot_do(llama: Program) -> None:
    q, o = linears_of(llama, "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj")
    assert "share its input" in check_input_scale(llama.gm, [q, o], torch.ones(64))
    assert "positive" in check_input_scale(llama.gm, [q], -torch.ones(64))
    assert "K=64" in check_input_scale(llama.gm, [q], torch.ones(32))
    with pytest.raises(ValueError, match="apply_input_scale"):
        apply_input_scale(llama.clone().gm, [], torch.ones(64))


# --- the passes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AWQ, SmoothQuant])
def test_passes_scale_every_group_exactly(llama: Program, cls: type) -> None:
    # verify=True: the runner fails an exact pass whose outputs move by more than 1e-4
    out, records = run_pipeline(llama, [cls()], calibration=calibration(3))
    stats = records[0].stats
    # per layer: q/k/v (RMSNorm), o_proj (inserted), gate/up (RMSNorm), down (up_proj rows); the tied lm_head
    # into the final norm, its table's rows scaled back after the embedding gather
    assert stats["scaled_groups"] == 9 and stats["linears"] == 15
    assert stats["absorbed"] == {"norm": 5, "inserted": 2, "linear": 2}
    assert stats["skipped"] == {}
    assert records[0].error["max_rel"] <= 1e-5
    batch = fresh_batch(llama)
    assert max_rel_error(llama(*batch), out(*batch)) <= 1e-5


def test_tied_head_is_smoothed_and_stays_one_table(llama: Program) -> None:
    out, records = run_pipeline(llama, [SmoothQuant(targets=("lm_head",))], calibration=calibration(2))
    assert records[0].stats["scaled_groups"] == 1 and records[0].stats["absorbed"] == {"norm": 1}
    emb = next(n for n in out.gm.graph.nodes if is_op(n, aten.embedding.default))
    (mul,) = emb.users  # the gathered rows times 1 / s
    assert is_op(mul, aten.mul.Tensor) and mul.args[1].target.endswith("output_scale")
    head = next(n for n in out.gm.graph.nodes if is_op(n, aten.linear.default) and n.args[1].target == emb.args[0].target)
    assert graph.get_tensor(out.gm, head.args[1]) is graph.get_tensor(out.gm, emb.args[0])  # still one tensor
    assert max_rel_error(llama(*fresh_batch(llama)), out(*fresh_batch(llama))) <= 1e-5
    quantized, _ = run_pipeline(out, [PASSES["quantize_embedding"](bits=8, symmetric=True)])
    assert not any(is_op(n, aten.embedding.default, aten.linear.default) and n.args[1 if is_op(n, aten.linear.default)
                   else 0].target == emb.args[0].target for n in quantized.gm.graph.nodes)


def test_head_shared_with_something_else_is_refused() -> None:
    class TiedTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 32, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(x)) + x @ self.head.weight.T.sum(1, keepdim=True)  # a non-embedding reader

    program = capture(TiedTwice(), (torch.randn(2, 3, 16),))
    (head,) = linears_of(program, "head")
    assert "shared" in check_input_scale(program.gm, [head], torch.ones(16))


def test_smoothquant_on_bert_inserts_where_the_residual_reads_the_norm() -> None:
    bert = capture_tiny("bert")
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 128, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.long)) for _ in range(2)]
    out, records = run_pipeline(bert, [SmoothQuant(alpha=0.5)], calibration=batches)
    assert records[0].stats["absorbed"] == {"inserted": 8}  # q/k/v, attention output, intermediate, output x 2
    assert records[0].error["max_rel"] <= 1e-5


def test_awq_then_rtn_beats_rtn_alone_on_activation_outliers() -> None:
    program = outlier_llama(20.0)
    spec = dict(bits=4, group_size=32, ignore=("lm_head",))
    test = calibration(3, seed=11)
    ref = torch.cat([program(*b) for b in test])

    def quality(passes: list) -> float:
        out, _ = run_pipeline(program, passes, calibration=calibration())
        return sqnr(ref, torch.cat([out(*b) for b in test]))

    rtn = quality([QuantizeRTN(**spec)])
    awq = quality([AWQ(**spec), QuantizeRTN(**spec)])
    # measured 16.6 dB -> 22.5 dB: the searched scales give the outlier channels back their resolution
    assert awq > rtn + 3.0, (awq, rtn)


def test_refusals(llama: Program) -> None:
    with pytest.raises(PipelineError, match="awq needs calibration data"):
        run_pipeline(llama, [AWQ()])
    with pytest.raises(PipelineError, match="match no linear layer"):
        run_pipeline(llama, [SmoothQuant(targets=("nothing_here",))], calibration=calibration(1))
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(ValueError, match="grid"):
        AWQ(grid=0)


def test_smoothquant_auto_alpha_is_exact_and_reports_its_choices(llama: Program) -> None:
    out, records = run_pipeline(llama, [SmoothQuant(alpha="auto")], calibration=calibration(2))
    stats = records[0].stats
    assert len(stats["alphas"]) == stats["scaled_groups"] == 9
    assert all(a in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) for a in stats["alphas"])
    assert records[0].error["max_rel"] <= 1e-5
    with pytest.raises(ValueError, match="auto"):
        SmoothQuant(alpha="best")


@pytest.mark.parametrize("make", [lambda n: SmoothQuant(alpha="auto", max_batches=n),
                                  lambda n: AWQ(bits=4, group_size=16, max_batches=n)], ids=["smoothquant", "awq"])
def test_scaling_observes_max_batches_spread_over_the_calibration(llama: Program, make) -> None:  # noqa: ANN001
    _, records = run_pipeline(llama, [make(2)], calibration=calibration(5))
    assert records[0].stats["calibration_batches"] == 2 and records[0].error["max_rel"] <= 1e-5
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"max_batches={bad!r} must be a whole number"):
            make(bad)
