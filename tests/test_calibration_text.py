"""graphpress.calibration_text: the default calibration mix never holds the evaluation text's source, is the
same on every run, and the model's own windows are sampled once and kept."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from graphpress import calibration_text as ct
from graphpress import evaluation as ev
from tests.conftest import tiny_llama


@pytest.fixture(autouse=True)
def _cache_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHPRESS_CACHE", str(tmp_path / "cache"))


class _Bytes:
    bos_token_id = 1

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": [b % 128 for b in text.encode()]}


def test_python_text_skips_the_evaluation_source_and_tests() -> None:
    files = ct.stdlib_files()
    parts = {part for f in files for part in f.parts}
    assert files and not parts & {"pydoc_data", "test", "idlelib"}
    text = ct.python_text(20_000)
    assert len(text) >= 20_000 and text == ct.python_text(20_000)  # fixed order
    # no paragraph of it is a paragraph of the evaluation text
    evaluation = set(gzip.decompress(ev.TEXT_FILE.read_bytes()).decode().split("\n\n"))
    paragraphs = [p for p in text.split("\n\n") if len(p) > 80]
    assert paragraphs and not [p for p in paragraphs if p in evaluation]


def test_python_windows_and_sentences_have_the_asked_shape() -> None:
    w = ct.python_windows(_Bytes(), 3, 64)
    assert w.shape == (3, 64) and w.dtype == torch.long
    sentences = ct.python_sentences(20)
    assert len(sentences) == 20 and all(30 <= len(s) <= 400 for s in sentences)


def test_generated_windows_start_at_bos_and_are_sampled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    first = ct.generated_windows(model, _Bytes(), 10, 24)
    assert first.shape == (10, 24) and bool((first[:, 0] == 1).all())
    assert len({tuple(r.tolist()) for r in first}) == 10  # sampled, not one greedy answer ten times

    def no_sampling(*args: object) -> torch.Tensor:
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(ct, "_sample", no_sampling)
    assert torch.equal(ct.generated_windows(model, _Bytes(), 10, 24), first)
    # fewer windows are the first ones (chunks of CHUNK, each with its own seed)
    assert torch.equal(ct.generated_windows(model, _Bytes(), ct.CHUNK, 24), first[: ct.CHUNK])


def test_another_model_samples_its_own_windows() -> None:
    a = ct.generated_windows(tiny_llama(seed=0), _Bytes(), 2, 16)
    b = ct.generated_windows(tiny_llama(seed=1), _Bytes(), 2, 16)
    assert ct.model_fingerprint(tiny_llama(seed=0)) != ct.model_fingerprint(tiny_llama(seed=1))
    assert not torch.equal(a, b)


def test_a_model_that_cannot_sample_is_refused() -> None:
    from graphpress.compress import Source, _default_windows

    src = Source("plain", torch.nn.Linear(2, 2), "causal-lm", _Bytes(), None, "plain")
    assert not ct.can_generate(src.model)
    with pytest.raises(ValueError, match="set generated: 0"):
        _default_windows(src, 4, 16, 2)
    ids, origin = _default_windows(src, 4, 16, None)  # by default: Python's text only
    assert ids.shape == (4, 16) and "generated" not in origin


def test_interleave_takes_each_source_in_turn() -> None:
    a, b = torch.zeros(3, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
    assert ct.interleave([a, b])[:, 0].tolist() == [0, 1, 0, 0]
