from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest
import torch

from graphpress import evaluation as ev
from graphpress.models import load_model


def test_calibration_never_overlaps_evaluation() -> None:
    ids = torch.arange(20 * ev.WINDOW)
    evals = ev.eval_windows(ids)
    calib = ev.calibration_windows(ids, 4)
    assert evals.shape == (16, 512) and calib.shape == (4, 512)
    assert set(evals.flatten().tolist()).isdisjoint(calib.flatten().tolist())
    assert calib[-1, -1] == ids[-1]  # taken from the end


def test_calibration_too_long_is_refused_with_numbers() -> None:
    ids = torch.arange(20 * ev.WINDOW)
    with pytest.raises(ev.CalibrationError, match="asked for 5 calibration windows .* only 4 fit"):
        ev.calibration_windows(ids, 5)


def test_perplexity_of_uniform_logits_is_vocab_size() -> None:
    windows = torch.randint(0, 50, (2, 16))
    assert ev.perplexity(lambda x: torch.zeros(*x.shape, 50), windows) == pytest.approx(50, rel=1e-5)


def test_encoder_cosine_against_itself_and_a_perturbed_copy() -> None:
    loaded = load_model("tiny-bert")
    ref = ev.torch_forward(loaded.model, "encoder")
    same = ev.evaluate("encoder", ref, loaded.tokenizer, reference=ref)
    assert same.metric == "cosine" and same.value == pytest.approx(1.0, abs=1e-6)

    def noisy(ids, mask):  # noqa: ANN001, ANN202
        out = ref(ids, mask)
        return out + torch.randn(out.shape, generator=torch.Generator().manual_seed(0)) * 4 * out.std()

    assert ev.evaluate("encoder", noisy, loaded.tokenizer, reference=ref).value < 0.95


def test_sentences_split_held_out_from_calibration() -> None:
    held_out, calib = ev.sentences(256), ev.sentences(256, from_end=True)
    assert len(held_out) == 256 and not set(held_out) & set(calib)


def test_the_evaluation_text_is_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped text is CPython 3.11's pydoc_data.topics, whatever Python runs the protocol; a changed file
    is refused rather than silently evaluated."""
    text = ev.corpus_text()
    if sys.version_info[:2] == (3, 11):
        from pydoc_data.topics import topics

        assert text == "\n\n".join(topics[k] for k in sorted(topics))
    changed = tmp_path / "text.gz"
    changed.write_bytes(gzip.compress(text.replace("assert", "asert", 1).encode()))
    monkeypatch.setattr(ev, "TEXT_FILE", changed)
    ev.corpus_text.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="not the pinned evaluation text"):
            ev.corpus_text()
    finally:
        ev.corpus_text.cache_clear()


def test_heldout_windows_spread_over_the_whole_text() -> None:
    ids = torch.arange(100 * 8)
    w = ev.spread_windows(ids, 4, 8)
    assert w.shape == (4, 8) and w[0, 0] == 0 and w[-1, -1] == ids[-1]
    with pytest.raises(ev.CalibrationError, match="fewer than 4 windows"):
        ev.spread_windows(torch.arange(20), 4, 8)


def test_heldout_text_is_found_by_path_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ev.heldout_text.cache_clear()
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name: None)  # as if gensim were not installed
    monkeypatch.delenv("GRAPHPRESS_HELDOUT", raising=False)
    with pytest.raises(ev.HeldOutTextMissing, match="pip install --no-deps gensim==4.4.0"):
        ev.named_text("heldout")
    wrong = tmp_path / "lee_background.cor"
    wrong.write_text("some other news\n")
    monkeypatch.setenv("GRAPHPRESS_HELDOUT", str(wrong))
    with pytest.raises(ev.HeldOutTextMissing, match="is not the held-out text"):
        ev.named_text("heldout")
    monkeypatch.setattr(ev, "HELDOUT_SHA256", __import__("hashlib").sha256(wrong.read_bytes()).hexdigest())
    assert ev.named_text("heldout") == "some other news\n"
    ev.heldout_text.cache_clear()
    with pytest.raises(ValueError, match="unknown evaluation text 'news'"):
        ev.named_text("news")
