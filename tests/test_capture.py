from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from graphpress.capture import CaptureError, capture
from tests.conftest import capture_tiny, tiny_bert, tiny_llama


def test_hf_causal_lm_keeps_names_meta_and_dynamic_dims() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = capture(model, {"input_ids": torch.randint(0, 128, (2, 10))})
    names = {n for n, _ in program.gm.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert program.kind == "causal-lm" and program.output_names == ("logits",)
    linears = [n for n in program.gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert linears and all("val" in n.meta and "nn_module_stack" in n.meta for n in linears)
    # other batch and sequence sizes run and match eager
    ids = torch.randint(0, 128, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(program(ids), model(ids, use_cache=False).logits)
    # the user's model is untouched
    assert type(model).__name__ == "LlamaForCausalLM"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_encoder_and_plain_modules() -> None:
    bert = capture_tiny("bert")
    assert bert.kind == "encoder" and bert.input_names == ("input_ids", "attention_mask")
    net = capture_tiny("convnet")
    assert net.kind == "module"
    out = net(torch.randn(5, 3, 8, 8))
    assert out.shape == (5, 4)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if y.sum() > 0:  # data-dependent branch: not capturable
            return y
        return -y


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _DataDependent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_uncapturable_model_names_module_and_line() -> None:
    with pytest.raises(CaptureError) as info:
        capture(_Outer(), (torch.randn(2, 4),), name="outer")
    msg = str(info.value)
    assert "outer" in msg and "block (_DataDependent)" in msg and "test_capture.py" in msg and "Try:" in msg


def test_batch_of_one_captures_and_stays_dynamic(tmp_path: Path) -> None:
    """A batch of one (one tokenized sentence) is what a user has first; the program and ONNX stay dynamic."""
    from graphpress.lowering.onnx import export_onnx, ort_forward

    cases = {
        "llama": (tiny_llama(), {"input_ids": torch.randint(0, 128, (1, 9))}),
        "bert": (tiny_bert(), {"input_ids": torch.randint(0, 128, (1, 9)), "attention_mask": torch.ones(1, 9).long()}),
        "plain": (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval(), (torch.randn(1, 6),)),
    }
    for name, (model, inputs) in cases.items():
        program = capture(model, inputs, name=name)
        three = tuple(torch.cat([x] * 3) for x in (inputs.values() if isinstance(inputs, dict) else inputs))
        with torch.no_grad():
            ref = model(*three) if name == "plain" else program(*three)
        exported = export_onnx(program, tmp_path / f"{name}.onnx")
        got = torch.from_numpy(ort_forward(exported.path)(*three))
        assert got.shape[0] == 3
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        h = torch.relu(self.fc1(x))
        return {"logits": self.fc2(h) * scale, "hidden": h}


def test_every_output_is_named_and_constants_are_bound(tmp_path: Path) -> None:
    from graphpress.lowering.onnx import export_onnx

    model = _TwoOutputs().eval()
    program = capture(model, {"x": torch.randn(2, 4), "scale": 0.5})
    assert program.input_names == ("x",) and program.output_names == ("logits", "hidden")
    x = torch.randn(3, 4)
    logits, hidden = program(x)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x, 0.5)["logits"])
    exported = export_onnx(program, tmp_path / "two.onnx")
    assert exported.check is not None and exported.check["max_rel"] < 1e-5


def test_inputs_that_do_not_fit_are_refused_in_one_line() -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(CaptureError, match=r"do not fit forward"):
        capture(model, (torch.randn(2, 4), torch.randn(2, 4)), name="lin")
    with pytest.raises(CaptureError, match=r"fails on its example inputs.*mat1 and mat2") as info:
        capture(model, (torch.randn(2, 5),), name="lin")
    assert "\n" not in str(info.value)
    with pytest.raises(CaptureError, match="hold no tensor"):
        capture(model, {"input": 3.0}, name="lin")


class _Star(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fc(xs[0] + xs[1])


def test_a_forward_taking_args_is_called_by_position() -> None:
    model = _Star().eval()
    program = capture(model, (torch.randn(2, 4), torch.randn(2, 4)), name="star")
    assert program.input_names == ("input_0", "input_1")
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(program(a, b), model(a, b))
    with pytest.raises(CaptureError, match="holds tensors inside a list"):
        capture(nn.Linear(4, 2), {"input": [torch.randn(2, 4)]}, name="lin")


class _Regions(torch.nn.Module):
    """A no-grad region (rotary tables are made so) and an autocast-disabled one, which torch.export keeps as
    submodules called by higher-order ops."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            positions = torch.arange(x.shape[1], device=x.device).float()
        with torch.autocast(x.device.type, enabled=False):
            doubled = x.float() * 2
        return self.lin(x) + positions + doubled


def test_grad_mode_and_autocast_regions_are_inlined() -> None:
    from graphpress.capture import capture

    model = _Regions()
    x = torch.randn(2, 4)
    program = capture(model, (x,), name="regions")
    ops = {getattr(n.target, "__name__", str(n.target)) for n in program.gm.graph.nodes}
    assert not ops & {"wrap_with_set_grad_enabled", "wrap_with_autocast", "_assert_tensor_metadata.default"}
    assert not [m for m in program.gm.modules() if m is not program.gm and isinstance(m, torch.fx.GraphModule)]
    torch.testing.assert_close(program(x), model(x))
    program.train()
    program(x).sum().backward()  # the program trains through what were the regions
    assert program.gm.lin.weight.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # export's dtype assertions would refuse bf16 here
        assert program.gm(x).shape == (2, 4)


def test_batch_and_sequence_stay_symbolic_through_shape_propagation() -> None:
    """The cache detach re-propagates every val; torch 2.11's fake aten.linear and matmul on 3-D operands
    would guard batch and sequence to the example's (graphpress.graph.fake_call), and graphpress.channels
    then no longer follows the channels (no attention found, a broken hidden-size cut)."""
    program = capture_tiny("llama")
    ids = next(iter(program.gm.graph.find_nodes(op="placeholder")))
    linears = [n for n in program.gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    for val in [ids.meta["val"], *(n.meta["val"] for n in linears)]:
        assert not any(str(d).isdigit() for d in val.shape[:2]), val.shape


@pytest.mark.parametrize(("a", "b", "bias"), [((2, 5, 8), (3, 8), True), ((2, 5, 8), (3, 8), False),
                                              ((4, 2, 5, 8), (4, 2, 8, 6), None), ((2, 5, 8), (8, 6), None),
                                              ((1, 2, 5, 8), (3, 1, 8, 6), None)])
def test_fake_call_computes_what_the_op_computes(a: tuple, b: tuple, bias: bool | None) -> None:
    """graph.fake_call's mm/bmm route for linear and matmul gives the op's own values (on real tensors)."""
    from graphpress.graph import fake_call

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(a, generator=g), torch.randn(b, generator=g)
    if bias is None:
        torch.testing.assert_close(fake_call(torch.ops.aten.matmul.default, (x, w), {}), x @ w)
    else:
        args = (x, w, torch.randn(b[0], generator=g)) if bias else (x, w)
        torch.testing.assert_close(fake_call(torch.ops.aten.linear.default, args, {}),
                                   torch.ops.aten.linear.default(*args))
