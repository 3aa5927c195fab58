"""A lowering rule of your own: your custom op -> ONNX, without touching graphpress.

Run it: ``python examples/custom_rule.py``. A program that calls an op no rule covers fails to export with a
line naming the op; a ``Rule`` maps the op to a function with the op's signature whose body is traced into
ONNX (plain torch ops, or ``torch.onnx.ops.symbolic`` for any domain). Tables compose with ``+``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from graphpress.capture import capture
from graphpress.lowering.onnx import LoweringError, export_onnx
from graphpress.lowering.onnxruntime_rules import onnxruntime_rules
from graphpress.lowering.rules import Rule, RuleTable


@torch.library.custom_op("example::scaled_gelu", mutates_args=())
def scaled_gelu(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.nn.functional.gelu(x) * scale


@scaled_gelu.register_fake
def _(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


def scaled_gelu_to_onnx(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The rule's body: traced by the ONNX exporter into Gelu and Mul."""
    return torch.nn.functional.gelu(x) * scale


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_gelu(self.fc(x), 0.5)


def main() -> None:
    program = capture(Net().eval(), (torch.randn(2, 8),))
    rules = onnxruntime_rules() + RuleTable((Rule(torch.ops.example.scaled_gelu.default, scaled_gelu_to_onnx,
                                                  target="onnx"),))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_onnx(program, Path(tmp) / "without.onnx")
            raise AssertionError("an op without a rule exported")
        except LoweringError as e:
            assert "example::scaled_gelu" in str(e), e
            print(f"without the rule: {str(e)[:110]}...")
        result = export_onnx(program, Path(tmp) / "with.onnx", rules=rules)
        print(f"with the rule: lowered {result.lowered}, onnxruntime vs torch SQNR {result.check['sqnr_db']:.1f} dB")


if __name__ == "__main__":
    main()
