"""`graphpress compress DIR --out OUT` (exact recipe) on tiny random Hugging Face models, saved as
``save_pretrained`` leaves them: with a tokenizer and only 256 positions (evaluation windows shortened to fit,
and reported), on the architectures whose positions or embeddings differ (rotary with grouped-query heads,
Gemma's scaled embedding, GPT-2's and OPT's learned positions, OPT's offset of 2, BERT, RoBERTa's positions
after the padding index); without a tokenizer (no evaluation, a note says why) on a decoder and an encoder.
Every architecture's capture, passes and export: tests/test_recipes_architectures.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphpress.compress import compress
from tests.hf_tiny import CAUSAL, save_tiny


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_exact_recipe_without_tokenizer(arch: str, tmp_path: Path) -> None:
    model_dir = save_tiny(arch, tmp_path / arch)
    report = compress(str(model_dir), tmp_path / "out", progress=False)
    assert report["onnx"]["check"]["max_rel"] <= 1e-4
    assert "no tokenizer" in report["evaluation"]["skipped"]
    assert report["latency"]["after"]["median_ms"] > 0
    assert not list((tmp_path / "out").glob("tokenizer*"))
    for record in report["passes"]:  # a pass that changed the graph says so
        assert record["modified"] or record["nodes_before"] == record["nodes_after"], record["name"]


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "opt", "bert", "roberta"])
def test_exact_recipe_with_tokenizer_and_256_positions(arch: str, tmp_path: Path) -> None:
    model_dir = save_tiny(arch, tmp_path / arch, tokenizer=True, positions=256)
    out = tmp_path / "out"
    report = compress(str(model_dir), out, progress=False)
    ev = report["evaluation"]
    assert report["onnx"]["check"]["max_rel"] <= 1e-4
    assert ev["after_onnx"]["value"] == pytest.approx(ev["before"]["value"], rel=1e-4)
    if arch in CAUSAL:
        assert ev["before"]["window"] == 256 and ev["before"]["shortened_from"] == 512
    else:
        assert ev["before"]["value"] == pytest.approx(1.0) and ev["before"]["max_tokens"] == 128
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "report.json").read_text())["model"]["context"] == 256
