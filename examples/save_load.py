"""Save a compressed program and load it back later, without re-running its passes.

Run it: ``python examples/save_load.py``. ``Program.save`` writes torch.export's ``.pt2`` archive (graph,
weights, sample batch) with graphpress's facts (input and output names, dynamic dimensions, kind) inside it;
``Program.load`` registers graphpress's ops first, so a quantized program loads in a fresh process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from graphpress.capture import capture
from graphpress.lowering.onnx import export_onnx
from graphpress.program import Program
from graphpress.recipes import load_recipe
from graphpress.runner import run_pipeline


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    program = capture(model, {"input_ids": torch.randint(0, 256, (1, 16))})
    calibration = [(torch.randint(0, 256, (4, 64)),)]
    w4, _ = run_pipeline(program, load_recipe("w4-rtn").passes, calibration=calibration)
    with tempfile.TemporaryDirectory() as tmp:
        path = w4.save(Path(tmp) / "w4.pt2")
        again = Program.load(path)
        ids = torch.randint(0, 256, (2, 9))
        torch.testing.assert_close(again(ids), w4(ids))
        result = export_onnx(again, Path(tmp) / "w4.onnx")
        print(f"saved {path.stat().st_size / 1e3:.0f} kB, reloaded, exported: lowered {result.lowered}")


if __name__ == "__main__":
    main()
