"""`graphpress compress` with a pruning recipe: the smaller ONNX file, and hf/ that `from_pretrained` reloads
to the same outputs, or the reason it was not written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from graphpress import kv_cache
from graphpress.compress import compress
from graphpress.lowering.onnx import ort_session
from tests.hf_tiny import save_tiny


@pytest.mark.parametrize("recipe", ["prune-20", "prune-depth-20"])
def test_pruned_llama_is_written_back_as_hugging_face(recipe: str, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny("llama", tmp_path / "llama", tokenizer=True, positions=256)
    out = tmp_path / "out"
    report = compress(str(model_dir), out, recipe, evaluate=False, progress=False)
    assert report["hf"] == {"path": "hf"}
    assert report["parameters"]["after"] < report["parameters"]["before"]
    with caplog.at_level(logging.WARNING, logger="transformers"):
        model = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert not [r for r in caplog.records if "weights" in r.getMessage().lower()]
    config = json.loads((out / "hf" / "config.json").read_text())
    if recipe == "prune-20":
        assert config["intermediate_size"] == 96 and config["num_attention_heads"] == 2
    else:
        assert config["num_hidden_layers"] == 1
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    session = ort_session(out / "model.onnx")
    got = session.run(None, kv_cache.complete_feed({"input_ids": ids.numpy()}, session.get_inputs()))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (out / "hf" / "tokenizer.json").is_file()


def test_hf_copy_is_skipped_with_its_reason_when_the_config_cannot_say_the_widths(tmp_path: Path) -> None:
    model_dir = save_tiny("gpt2", tmp_path / "gpt2", tokenizer=True, positions=256)
    report = compress(str(model_dir), tmp_path / "out", "prune-20", evaluate=False, progress=False)
    assert "skipped" in report["hf"] and not (tmp_path / "out" / "hf").exists()
    assert (tmp_path / "out" / "model.onnx").is_file()
