"""The CLI end to end: bad input gets one actionable line, exit 1, and no output directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graphpress.cli import main

UNCAPTURABLE = '''
import torch

class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:
            return y
        return -y

def build():
    return Branchy(), (torch.randn(2, 4),)
'''

CONVNET = '''
import torch

def build():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    return net.eval(), (torch.randn(2, 3, 8, 8),)
'''


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graphpress: error: "), err
    assert match in err[0], err[0]
    return err[0]


def _no_leftovers(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith(".out")], list(parent.iterdir())


def test_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["compress", "no-such-model", "--out", str(tmp_path / "out")], capsys, "unknown model 'no-such-model'")
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["compress", "tiny-llama", "--recipe", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")],
           capsys, "not found")
    assert not (tmp_path / "out").exists()


def test_unreadable_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [\n  - pass: remove_noops\n  unclosed")
    _fails(["compress", "tiny-llama", "--recipe", str(bad), "--out", str(tmp_path / "out")], capsys,
           "cannot read recipe")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("passes:\n  - pass: make_it_faster\n")
    _fails(["compress", "tiny-llama", "--recipe", str(unknown), "--out", str(tmp_path / "out")], capsys,
           "unknown pass 'make_it_faster'")
    assert not (tmp_path / "out").exists()


def test_uncapturable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_file = tmp_path / "branchy.py"
    model_file.write_text(UNCAPTURABLE)
    line = _fails(["compress", f"{model_file}:build", "--out", str(tmp_path / "out")], capsys, "cannot capture")
    assert "branchy.py:11" in line and "Try:" in line
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_missing_onnx_file_and_occupied_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["eval", str(tmp_path / "missing.onnx")], capsys, "does not exist")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _fails(["compress", "tiny-llama", "--out", str(out)], capsys, "exists and is not empty")
    assert (out / "keep.txt").read_text() == "user data"


def test_compress_plain_module_from_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_file = tmp_path / "net.py"
    model_file.write_text(CONVNET)
    out = tmp_path / "out"
    assert main(["compress", f"{model_file}:build", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.onnx").is_file() and sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    assert [p["name"] for p in report["passes"]] == ["remove_noops", "fold_batchnorm", "fold_norm_scales",
                                                     "merge_sibling_linears", "fuse_rms_norm", "fuse_rotary"]
    assert report["passes"][1]["stats"]["folded"] == 1 and report["onnx"]["check"]["max_rel"] < 1e-5
    assert report["evaluation"] is None
    _no_leftovers(tmp_path)


def test_compress_and_eval_tiny_llama(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["compress", "tiny-llama", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "recipe", "passes", "parameters", "bytes", "onnx", "evaluation", "seconds"):
        assert key in report
    ev = report["evaluation"]
    assert ev["after_onnx"]["value"] == pytest.approx(ev["before"]["value"], rel=1e-4)
    for record in report["passes"]:
        assert {"seconds", "nodes_before", "nodes_after", "bytes_before", "bytes_after", "error"} <= set(record)
    # eval of the ONNX file runs in onnxruntime, through the console script, and writes JSON
    proc = subprocess.run([sys.executable, "-m", "graphpress.cli", "eval", str(out / "model.onnx"),
                           "--json", str(tmp_path / "e.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["runtime"] == "onnxruntime"
    assert result["value"] == pytest.approx(ev["after_onnx"]["value"], rel=1e-6)


def test_calibration_longer_than_text_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "greedy.yaml"
    recipe.write_text("passes:\n  - pass: gptq\n    bits: 4\ncalibration: {windows: 100000, length: 512}\n")
    _fails(["compress", "tiny-llama", "--recipe", str(recipe), "--out", str(tmp_path / "out")], capsys,
           "asked for 100000 calibration windows")
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_bad_pass_option_in_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bits.yaml"
    recipe.write_text("passes:\n  - pass: rtn\n    bits: 3\n")
    _fails(["compress", "tiny-llama", "--recipe", str(recipe), "--out", str(tmp_path / "out")], capsys,
           "bits=3 is not supported")
