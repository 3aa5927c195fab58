"""The evaluation protocol, one for every artifact (torch model, captured program, ONNX file).

Text: CPython 3.11's ``pydoc_data.topics``, the topics joined in sorted key order with blank lines, pinned in
the package with its hash (``TEXT_FILE``), tokenized once (no special tokens).

Causal LMs: perplexity over the first 16 windows of 512 tokens (each window scored on its 511 next-token
predictions). Calibration windows come from the end of the token stream and never overlap evaluation.

Encoders: sentences from the start of the text are held out for evaluation; the score is the mean cosine
similarity between pooled (attention-masked mean) sentence embeddings of the artifact and of the
uncompressed model. Calibration sentences come from the end.

The held-out text of another domain (``text="heldout"``): news, the Lee corpus' background documents (300
ABC news articles, Lee, Pincombe & Welsh 2005), ``gensim/test/test_data/lee_background.cor`` in the gensim
4.4.0 distribution on PyPI, SHA-256 ``HELDOUT_SHA256``. It is never calibration or training text. Causal LMs:
16 windows of 512 tokens spread evenly over it; encoders: its first 256 sentences. graphpress does not ship
it: ``pip install --no-deps gensim==4.4.0`` (the file is read, gensim is never imported), or point
``GRAPHPRESS_HELDOUT`` at the file.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

EVAL_WINDOWS = 16
WINDOW = 512
EVAL_SENTENCES = 256
SENTENCE_MAX_TOKENS = 128

# forward(*inputs) -> logits [B, S, V] (causal) or last hidden state [B, S, H] (encoder)
Forward = Callable[..., Any]


class CalibrationError(ValueError):
    """Asked for more calibration data than the text holds without overlapping evaluation."""


TEXT_FILE = Path(__file__).parent / "data" / "pydoc_topics.txt.gz"
TEXT_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """The protocol's text, pinned: CPython 3.11's ``pydoc_data.topics`` shipped in the package (see
    graphpress/data/README.md), so every Python version evaluates the same tokens."""
    data = gzip.decompress(TEXT_FILE.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != TEXT_SHA256:
        raise RuntimeError(f"{TEXT_FILE} is not the pinned evaluation text (SHA-256 {digest}): reinstall graphpress")
    return data.decode()


HELDOUT_MEMBER = "gensim/test/test_data/lee_background.cor"
HELDOUT_SHA256 = "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb"
TEXTS = ("protocol", "heldout")


class HeldOutTextMissing(FileNotFoundError):
    """The held-out text is not on this machine."""


@functools.lru_cache(maxsize=1)
def heldout_text() -> str:
    """The held-out news text (see the module docstring), found through ``GRAPHPRESS_HELDOUT`` or an installed
    gensim distribution, checked against its hash."""
    candidates = []
    if os.environ.get("GRAPHPRESS_HELDOUT"):
        candidates.append(Path(os.environ["GRAPHPRESS_HELDOUT"]))
    spec = importlib.util.find_spec("gensim")  # finds the folder without importing gensim
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent.parent / HELDOUT_MEMBER)
    for path in candidates:
        if path.is_file():
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != HELDOUT_SHA256:
                raise HeldOutTextMissing(f"{path} is not the held-out text (SHA-256 {digest}, expected "
                                         f"{HELDOUT_SHA256}): install gensim==4.4.0 or fix GRAPHPRESS_HELDOUT")
            return data.decode()
    raise HeldOutTextMissing("the held-out text (the Lee news corpus from gensim 4.4.0) is not here: run "
                             "`pip install --no-deps gensim==4.4.0`, or set GRAPHPRESS_HELDOUT to a copy of "
                             f"{HELDOUT_MEMBER}")


def named_text(name: str) -> str:
    """The protocol's text (``"protocol"``) or the held-out text of another domain (``"heldout"``)."""
    if name not in TEXTS:
        raise ValueError(f"unknown evaluation text {name!r} (expected one of {', '.join(TEXTS)})")
    return corpus_text() if name == "protocol" else heldout_text()


@functools.lru_cache(maxsize=4)
def token_stream(tokenizer: Any, name: str = "protocol") -> torch.Tensor:
    """A whole text as one stream of token ids [T] (cached per tokenizer)."""
    ids = tokenizer(named_text(name), add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).flatten()


def spread_windows(ids: torch.Tensor, n: int = EVAL_WINDOWS, length: int = WINDOW) -> torch.Tensor:
    """``n`` windows spread evenly over the stream (the held-out text: every part of it weighs): [n, length]."""
    if ids.numel() < n * length:
        raise CalibrationError(f"the text has {ids.numel()} tokens, fewer than {n} windows of {length}")
    step = (ids.numel() - length) // max(n - 1, 1)
    return torch.stack([ids[i * step : i * step + length] for i in range(n)])


def eval_windows(ids: torch.Tensor, n: int = EVAL_WINDOWS, length: int = WINDOW) -> torch.Tensor:
    """The first ``n`` windows: [n, length]."""
    if ids.numel() < n * length:
        raise CalibrationError(f"the text has {ids.numel()} tokens, fewer than {n} windows of {length}")
    return ids[: n * length].view(n, length)


def window_length(context: int | None, length: int = WINDOW) -> int:
    """``length``, shortened to the model's context (positions it can attend to) when that is shorter."""
    return min(length, context) if context else length


def calibration_windows(ids: torch.Tensor, n: int, length: int = WINDOW, eval_length: int = WINDOW
                        ) -> torch.Tensor:
    """``n`` windows taken from the end of the stream: [n, length]; never overlaps the evaluation windows
    (``EVAL_WINDOWS`` of ``eval_length`` tokens)."""
    available = (ids.numel() - EVAL_WINDOWS * eval_length) // length
    if n < 1 or n > available:
        raise CalibrationError(
            f"asked for {n} calibration windows of {length} tokens, but only {available} fit after the "
            f"{EVAL_WINDOWS} evaluation windows of {eval_length} in {ids.numel()} tokens: ask for fewer or "
            "shorter windows"
        )
    return ids[ids.numel() - n * length :].view(n, length)


def perplexity(forward: Forward, windows: torch.Tensor, progress: bool = False) -> float:
    """exp(mean next-token NLL) over all windows; ``forward(ids [1, L])`` returns logits [1, L, V]."""
    nll, count = 0.0, 0
    rows: Sequence[torch.Tensor] = windows
    if progress:
        from tqdm import tqdm

        rows = tqdm(windows, desc="perplexity", unit="window", disable=None, leave=False)
    for w in rows:
        logits = torch.as_tensor(np.asarray(forward(w[None]))).float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count)


def sentences(n: int = EVAL_SENTENCES, from_end: bool = False, name: str = "protocol") -> list[str]:
    """Sentences of 30..400 characters, in text order, from the start (evaluation) or the end (calibration)."""
    good = [" ".join(s.split()) for s in split_sentences(named_text(name)) if 30 <= len(s) <= 400]
    if not from_end:
        return good[:n]
    # the text repeats some sentences: calibration never takes one that is held out for evaluation
    held_out = set(good[:EVAL_SENTENCES])
    return [s for s in reversed(good) if s not in held_out][:n]


def split_sentences(text: str) -> list[str]:
    """``text`` split after . ! ? and at blank lines, each part stripped, empty parts dropped."""
    parts = (s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text))
    return [s for s in parts if s]


def pooled_embeddings(forward: Forward, tokenizer: Any, texts: list[str], batch: int = 32,
                      max_tokens: int = SENTENCE_MAX_TOKENS) -> torch.Tensor:
    """Attention-masked mean pooling of the last hidden state, L2-normalized: [len(texts), H]."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True,
                        max_length=max_tokens, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        hidden = torch.as_tensor(np.asarray(forward(ids, mask))).float()
        m = mask[..., None].float()
        out.append(torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out)


def cosine_similarity(forward: Forward, reference: Forward, tokenizer: Any,
                      max_tokens: int = SENTENCE_MAX_TOKENS, name: str = "protocol") -> dict[str, float]:
    texts = sentences(name=name)
    a = pooled_embeddings(forward, tokenizer, texts, max_tokens=max_tokens)
    b = pooled_embeddings(reference, tokenizer, texts, max_tokens=max_tokens)
    cos = (a * b).sum(-1)
    return {"mean": cos.mean().item(), "min": cos.min().item()}


@dataclass
class Evaluation:
    metric: str  # "perplexity" or "cosine"
    value: float
    details: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, **self.details}


def evaluate(kind: str, forward: Forward, tokenizer: Any, reference: Forward | None = None,
             progress: bool = False, context: int | None = None, text: str = "protocol") -> Evaluation:
    """Run the protocol for ``kind`` ("causal-lm" or "encoder") on ``text`` ("protocol" or "heldout");
    windows (sentences) are shortened to the model's ``context`` when it is shorter than the protocol's, and
    the details say so."""
    if kind == "causal-lm":
        length = window_length(context)
        ids = token_stream(tokenizer, text)
        windows = eval_windows(ids, length=length) if text == "protocol" else spread_windows(ids, length=length)
        ppl = perplexity(forward, windows, progress=progress)
        details: dict[str, Any] = {"text": text, "windows": len(windows), "window": length}
        if length < WINDOW:
            details["shortened_from"] = WINDOW
        return Evaluation("perplexity", ppl, details)
    if kind == "encoder":
        if reference is None:
            raise ValueError("encoder evaluation needs the uncompressed model as reference")
        max_tokens = window_length(context, SENTENCE_MAX_TOKENS)
        cos = cosine_similarity(forward, reference, tokenizer, max_tokens, text)
        details = {"text": text, "min": cos["min"], "sentences": EVAL_SENTENCES, "max_tokens": max_tokens}
        if max_tokens < SENTENCE_MAX_TOKENS:
            details["shortened_from"] = SENTENCE_MAX_TOKENS
        return Evaluation("cosine", cos["mean"], details)
    raise ValueError(f"no evaluation protocol for model kind {kind!r} (expected causal-lm or encoder)")


def torch_forward(module: Callable[..., Any], kind: str) -> Forward:
    """Adapt a Hugging Face model or a captured program to ``forward(*inputs) -> tensor``."""

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if isinstance(module, torch.nn.Module) and not isinstance(module, torch.fx.GraphModule):
                names = ("input_ids", "attention_mask")
                kwargs = dict(zip(names, inputs, strict=False))
                if kind == "causal-lm":
                    return module(**kwargs, use_cache=False).logits
                return module(**kwargs).last_hidden_state
            return module(*inputs)

    return forward
