from __future__ import annotations

import pytest
import torch
from torch import nn

from graphpress.capture import CaptureError, capture
from tests.conftest import capture_tiny, tiny_llama


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
