"""A model with two outputs: both are named, verified after every pass and exported.

Run it: ``python examples/two_outputs.py``. Capture flattens what the forward returns (a tuple, a dict) into
named outputs; the runner compares every output with the stage before, so an "exact" pass that changes only
the second output is caught; the ONNX file has one output per tensor, checked in onnxruntime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch

from graphpress.capture import capture
from graphpress.lowering.onnx import export_onnx
from graphpress.passes import PASSES
from graphpress.runner import run_pipeline


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        return {"logits": self.head(features), "features": features}


def main() -> None:
    program = capture(Encoder().eval(), (torch.randn(1, 3, 16, 16),))
    assert program.output_names == ("logits", "features")
    folded, records = run_pipeline(program, [PASSES["remove_noops"](), PASSES["fold_batchnorm"]()])
    print(f"fold_batchnorm: {records[-1].stats['folded']} folded, worst output error {records[-1].error['max_rel']:.1e}")
    with tempfile.TemporaryDirectory() as tmp:
        result = export_onnx(folded, Path(tmp) / "encoder.onnx")
        names = [o.name for o in onnx.load(str(result.path)).graph.output]
        assert names == ["logits", "features"], names
        print(f"ONNX outputs {names}, onnxruntime vs torch SQNR {result.check['sqnr_db']:.1f} dB")


if __name__ == "__main__":
    main()
