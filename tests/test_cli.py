"""The CLI end to end on good input (bad input: test_cli_bad_input.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from graphpress.cli import main

CONVNET = '''
import torch

def build():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    return net.eval(), (torch.randn(2, 3, 8, 8),)
'''


USER_MODELS = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x, scale=1.0):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) * scale, h

def one_row():
    return Net(), (torch.randn(1, 8),)

def with_float():
    return Net(), {"x": torch.randn(2, 8), "scale": 0.5}
'''


@pytest.mark.parametrize("factory", ["one_row", "with_float"])
def test_user_models_with_tuples_floats_and_one_row(factory: str, tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_MODELS)
    out = tmp_path / "out"
    assert main(["compress", f"{tmp_path / 'user.py'}:{factory}", "--out", str(out), "--no-eval"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["check"]["max_rel"] < 1e-5
    model = onnx.load(str(out / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith(".out")], list(parent.iterdir())


def test_compress_plain_module_from_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_file = tmp_path / "net.py"
    model_file.write_text(CONVNET)
    out = tmp_path / "out"
    assert main(["compress", f"{model_file}:build", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == [".graphpress", "model.onnx", "report.json"]
    assert [p["name"] for p in report["passes"]] == ["remove_noops", "linearize_matmuls", "fold_batchnorm",
                                                     "fold_norm_scales", "merge_sibling_linears", "fuse_rms_norm",
                                                     "fuse_rotary", "fuse_attention"]
    assert report["passes"][2]["stats"]["folded"] == 1 and report["onnx"]["check"]["max_rel"] < 1e-5
    assert report["evaluation"] is None
    _no_leftovers(tmp_path)


def test_compress_and_eval_tiny_llama(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the summary fits 80 columns when piped, without cutting a pass name or a number
    proc = subprocess.run([sys.executable, "-m", "graphpress.cli", "compress", "tiny-llama", "--out", str(out),
                           "--eval-torch"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and max(len(line) for line in proc.stdout.splitlines()) <= 80, proc.stdout
    assert "…" not in proc.stdout and "merge_sibling_linears" in proc.stdout
    for row in ("ONNX size", "perplexity", "latency"):
        assert row in proc.stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "recipe", "passes", "parameters", "bytes", "onnx", "evaluation", "seconds"):
        assert key in report
    ev = report["evaluation"]
    assert ev["after_onnx"]["value"] == pytest.approx(ev["before"]["value"], rel=1e-4)
    assert ev["after_torch"]["value"] == pytest.approx(ev["before"]["value"], rel=1e-4)  # --eval-torch
    for record in report["passes"]:
        assert {"seconds", "nodes_before", "nodes_after", "bytes_before", "bytes_after", "error"} <= set(record)
    # eval of the ONNX file runs in onnxruntime, through the console script, and writes JSON
    proc = subprocess.run([sys.executable, "-m", "graphpress.cli", "eval", str(out / "model.onnx"),
                           "--json", str(tmp_path / "e.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["runtime"] == "onnxruntime"
    assert result["value"] == pytest.approx(ev["after_onnx"]["value"], rel=1e-6)
    assert report["latency"]["before"]["median_ms"] > 0 and report["bytes"]["onnx_file_before"] > 0
    # eval writes nothing unasked, and an output directory is a target too
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["eval", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # the ONNX file names its dynamic dimensions as the program does
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("graphpress 0.")


