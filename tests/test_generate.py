"""Generation: the decoding loop, ``graphpress generate`` on an output directory and on a Hugging Face one,
the onnxruntime-genai directory ``compress`` writes, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graphpress.cli import main
from graphpress.generate import decode
from tests.hf_tiny import save_tiny


def test_decode_is_greedy_stops_at_eos_and_samples_reproducibly() -> None:
    fed: list[list[int]] = []

    def step(ids: np.ndarray) -> np.ndarray:  # the next token is the last one plus one
        fed.append(ids[0].tolist())
        logits = np.zeros(10)
        logits[(ids[0, -1] + 1) % 10] = 5.0
        return logits

    out = decode(step, [1, 2], 4, runtime="test")
    assert out.tokens == [3, 4, 5, 6] and fed == [[1, 2], [3], [4], [5]]  # the prompt once, then one at a time
    assert out.prompt_tokens == 2 and out.first_token_ms >= 0 and out.tokens_per_second > 0
    assert decode(step, [1, 2], 8, eos=(5,)).tokens == [3, 4, 5]
    a = decode(step, [1], 6, greedy=False, seed=3).tokens
    assert a == decode(step, [1], 6, greedy=False, seed=3).tokens and len(a) == 6


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama with a tokenizer, and its exact recipe's output directory."""
    model = save_tiny("llama", tmp_path_factory.mktemp("hf") / "tiny-llama", tokenizer=True, positions=64)
    out = tmp_path_factory.mktemp("out") / "exact"
    assert main(["compress", str(model), "--recipe", "exact", "--out", str(out), "--no-eval"]) == 0
    return model, out


def _generated(capsys: pytest.CaptureFixture[str], target: Path, *extra: str) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["generate", str(target), "--prompt", "def main():", "--greedy", "--max-new-tokens", "12",
                 *extra]) == 0
    text, _, stats = capsys.readouterr().out.rpartition("\n[")
    return text, stats


def test_generate_streams_the_export_as_transformers_generates(compressed, capsys) -> None:
    model, out = compressed
    text, stats = _generated(capsys, out)
    reference, ref_stats = _generated(capsys, model)
    assert text == reference and len(text) > 0
    assert stats.startswith("onnxruntime:") and "time to first token" in stats and "tokens/s" in stats
    assert ref_stats.startswith("torch:")


def test_onnxruntime_genai_loads_the_output_and_generates_as_transformers(compressed) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, out = compressed
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    assert config["search"]["past_present_share_buffer"] is True  # GroupQueryAttention appends in place
    report = json.loads((out / "report.json").read_text())
    assert report["genai"] == {"path": "genai_config.json"}
    model = og.Model(str(out))
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    for prompt in ([5, 6, 7], list(range(40, 60)), [300, 2, 2, 9, 11]):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        expected = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        assert tokens[: len(expected)] == expected


def test_generate_refuses_what_cannot_generate(compressed, tmp_path, capsys) -> None:
    model, out = compressed
    assert main(["generate", str(out), "--prompt", "x" * 200]) == 1  # 200 byte tokens, 64 positions
    assert "attends to 64 positions: shorten the prompt" in capsys.readouterr().err
    bert = save_tiny("bert", tmp_path / "tiny-bert", tokenizer=True)
    assert main(["generate", str(bert), "--prompt", "hello"]) == 1
    assert "is an encoder: generate needs a causal language model" in capsys.readouterr().err
    bare = tmp_path / "bare"
    assert main(["compress", "tiny-llama", "--recipe", "exact", "--out", str(bare), "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["generate", str(bare), "--prompt", "hello"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tokenizer" in err[0] and "save the model's tokenizer" in err[0]
