"""Calibration recipes on tiny Hugging Face models: token ids from a file (``--calibration``) or from Python
(``calibration=``) on models saved without a tokenizer, text from a file on a model with one, and the report
naming where the calibration came from (refusals: test_cli_bad_input.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from graphpress.cli import main
from graphpress.compress import compress
from tests.hf_tiny import save_tiny

GPTQ = "passes:\n  - pass: gptq\n    bits: 4\n    group_size: 32\ncalibration: {windows: 4, length: 32}\n"
SMOOTH = "passes:\n  - pass: smoothquant\ncalibration: {sentences: 2}\n"


def _record(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in report["passes"] if r["name"] == name)


def test_cli_token_ids_calibrate_a_model_without_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = save_tiny("llama", tmp_path / "llama")
    (tmp_path / "gptq.yaml").write_text(GPTQ)
    ids = tmp_path / "ids.txt"
    rows = [list(range(40)), list(range(100, 132)), list(range(200, 220))]  # cut to 32; 32; 20 (not padded)
    ids.write_text("\n".join(" ".join(map(str, r)) for r in rows) + "\n\n")
    monkeypatch.chdir(tmp_path)
    assert main(["compress", str(model), "--recipe", "gptq.yaml", "--out", "out", "--calibration", "ids.txt",
                 "--no-eval"]) == 0
    assert (tmp_path / "out" / "model.onnx").is_file()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cal = report["calibration"]
    assert cal["source"] == str(ids.resolve()) and cal["sha256"] == hashlib.sha256(ids.read_bytes()).hexdigest()
    assert (cal["format"], cal["windows"], cal["asked"], cal["length"], cal["cut"]) == ("ids", 3, 4, 32, 1)
    assert _record(report, "gptq")["stats"]["calibration_batches"] == 2  # two windows of 32, one of 20
    assert _record(report, "gptq")["modified"]
    assert "calibration: 3 calibration windows from" in " ".join(capsys.readouterr().out.split())


def test_python_token_ids_calibrate_an_encoder_without_tokenizer(tmp_path: Path) -> None:
    model = save_tiny("bert", tmp_path / "bert")
    (tmp_path / "smooth.yaml").write_text(SMOOTH)
    rows = [[2, 50, 60, 3], [2, 70, 3], [2, 80, 90, 100, 3]]
    report = compress(str(model), tmp_path / "out", str(tmp_path / "smooth.yaml"), evaluate=False,
                      progress=False, calibration=rows)
    cal = report["calibration"]
    assert cal["source"] == "token ids given to compress()" and (cal["sentences"], cal["rows"]) == (2, 3)
    assert "note" not in cal  # as many sentences as the recipe asks for
    assert _record(report, "smoothquant")["stats"]["calibration_batches"] == 1
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_text_file_replaces_the_builtin_text_for_a_model_with_tokenizer(tmp_path: Path) -> None:
    model = save_tiny("llama", tmp_path / "llama", tokenizer=True)
    (tmp_path / "gptq.yaml").write_text(GPTQ)
    text = tmp_path / "text.txt"
    text.write_text("Calibration text: one token per ASCII byte. " * 4)
    report = compress(str(model), tmp_path / "out", str(tmp_path / "gptq.yaml"), evaluate=False, progress=False,
                      calibration=text)
    cal = report["calibration"]
    assert (cal["format"], cal["windows"], cal["length"]) == ("text", 4, 32)  # 176 tokens: 5 windows, 4 asked
    assert cal["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert _record(report, "gptq")["stats"]["calibration_batches"] == 1


def test_report_names_the_builtin_mix_when_no_file_is_given(tmp_path: Path) -> None:
    (tmp_path / "gptq.yaml").write_text(GPTQ)
    report = compress("tiny-llama", tmp_path / "out", str(tmp_path / "gptq.yaml"), evaluate=False, progress=False)
    cal = report["calibration"]
    # half of the windows Python's docstrings, half sampled from the model (graphpress.calibration_text)
    assert (cal["source"], cal["windows"], cal["python"]["windows"], cal["generated"]["windows"]) == \
        ("built-in", 4, 2, 2)
    # the recipe can ask for none sampled; the token ids differ, and the report's hash says so
    (tmp_path / "plain.yaml").write_text(GPTQ.replace("length: 32}", "length: 32, generated: 0}"))
    plain = compress("tiny-llama", tmp_path / "plain", str(tmp_path / "plain.yaml"), evaluate=False,
                     progress=False)["calibration"]
    assert (plain["python"]["windows"], "generated" in plain) == (4, False) and plain["sha256"] != cal["sha256"]
    assert compress("tiny-llama", tmp_path / "exact", evaluate=False, progress=False)["calibration"] is None
