"""The default calibration text: never the evaluation text, and not one domain.

Two sources, mixed (the recipe's ``calibration`` says how many windows come from each):
- **Python's own text**: the docstrings of the standard library's modules, classes and functions, read from the
  source files with ``ast`` (nothing is imported), files in a fixed shuffled order, ``pydoc_data`` (the
  evaluation text's source), tests and tool packages left out. Every Python installation has it.
- **Text the model writes itself**: windows sampled from the model (temperature 1, from its BOS token), the
  data-free calibration of LLM-QAT (Liu et al., 2023). It follows the model's own distribution over every
  domain it learned, where Python's docstrings are one narrow domain. Sampling costs about as much as a
  forward per token, so the windows are kept in graphpress's cache (graphpress.cache), keyed by the model's
  weights, the count, the length and the seed.

Calibrated only on the evaluation text's domain, W4 AWQ+GPTQ lost three times more perplexity on news text
than on the evaluation text (BENCHMARKS.md, issue 10).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import logging
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphpress import cache

log = logging.getLogger(__name__)

# folders of the standard library whose text is not prose about the library: tests, the evaluation text's source,
# bundled tools and their data
_SKIP = {"test", "tests", "idlelib", "pydoc_data", "site-packages", "dist-packages", "turtledemo", "lib2to3",
         "__phello__", "ensurepip", "venv", "__pycache__"}
MIN_DOCSTRING = 120  # characters: shorter ones are mostly "Return x." lines
SEED = 0
CHUNK = 8  # windows sampled together


class TooLittleText(ValueError):
    """Python's docstrings hold fewer windows than asked for."""

    def __init__(self, asked: int, available: int) -> None:
        super().__init__(f"asked for {asked} windows of Python's docstrings, but they hold {available}")
        self.asked, self.available = asked, available


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's source files (without the folders in ``_SKIP``), sorted."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP and not d.startswith("config-"))
        out.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(out)


def docstrings(path: Path) -> Iterator[str]:
    """The docstrings of a source file's module, classes and functions, in file order (none if it does not
    parse)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING:
                yield doc


def python_text(chars: int, seed: int = SEED) -> str:
    """At least ``chars`` characters of standard-library docstrings (all of them if there are fewer), files
    in a shuffled order fixed by ``seed``, docstrings separated by blank lines."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    parts: list[str] = []
    total = 0
    for path in files:
        for doc in docstrings(path):
            parts.append(doc)
            total += len(doc) + 2
        if total >= chars:
            break
    return "\n\n".join(parts)


def python_windows(tokenizer: Any, n: int, length: int) -> torch.Tensor:
    """``n`` windows of ``length`` tokens of Python's docstrings: [n, length]."""
    chars = n * length * 6  # English in BPE tokenizers: ~4 characters a token; code-like text fewer
    while True:
        text = python_text(chars)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() >= n * length or len(text) < chars:
            break
        chars *= 2
    if ids.numel() < n * length:
        raise TooLittleText(n, ids.numel() // length)
    return ids[: n * length].view(n, length)


def python_sentences(n: int) -> list[str]:
    """``n`` sentences (30..400 characters) from Python's docstrings, for encoders."""
    from graphpress.evaluation import split_sentences

    chars = n * 200
    while True:
        text = python_text(chars)
        good = [s for s in (" ".join(s.split()) for s in split_sentences(text)) if 30 <= len(s) <= 400]
        if len(good) >= n or len(text) < chars:
            return good[:n]
        chars *= 2


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of ``parts`` (each [n_i, L]) taken in turn, one of each while they last: any first rows hold
    every source."""
    rows = [r for group in itertools.zip_longest(*[p.unbind() for p in parts]) for r in group if r is not None]
    return torch.stack(rows)


def can_generate(model: nn.Module) -> bool:
    """A Hugging Face causal LM that can sample (``generate``)."""
    return callable(getattr(model, "generate", None)) and getattr(model, "config", None) is not None


def generated_windows(model: nn.Module, tokenizer: Any, n: int, length: int, seed: int = SEED,
                      progress: bool = False, chunk: int = CHUNK, kind: str = "calibration",
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` windows of ``length`` tokens sampled from ``model`` (temperature 1, no top-k or top-p), each
    starting with the BOS token (token 0 when the tokenizer has none): [n, length]. Sampled in chunks of
    ``chunk`` windows, chunk ``c`` seeded with ``seed + c`` and kept in the cache under ``kind``: asking for more
    windows later samples only the new chunks, and the first windows never depend on how many were asked for.
    ``device``: where to sample (the model is moved there and back; default: where it is)."""
    fingerprint = model_fingerprint(model)
    home = next(model.parameters()).device
    chunks = []
    try:
        for c in range((n + chunk - 1) // chunk):
            def sample(c: int = c) -> torch.Tensor:
                model.to(device or home)
                return _sample(model, tokenizer, chunk, length, seed + c, progress)

            def build(folder: Path, sample=sample) -> None:  # noqa: ANN001
                _save(folder, sample())

            folder = cache.cached(kind, cache.key("generated", fingerprint, chunk, length, seed + c), build)
            if folder is None:
                chunks.append(sample())
            else:
                chunks.append(torch.tensor(json.loads((folder / "windows.json").read_text()), dtype=torch.long))
    finally:
        model.to(home)
    return torch.cat(chunks)[:n]


def _save(folder: Path, windows: torch.Tensor) -> None:
    (folder / "windows.json").write_text(json.dumps(windows.tolist()))


def _sample(model: nn.Module, tokenizer: Any, n: int, length: int, seed: int, progress: bool) -> torch.Tensor:
    bos = getattr(tokenizer, "bos_token_id", None)
    device = next(model.parameters()).device
    start = torch.full((n, 1), bos if isinstance(bos, int) else 0, dtype=torch.long, device=device)
    log.info("sampling %d windows of %d tokens from the model (seed %d; kept in %s)", n, length, seed,
             cache.cache_dir())
    bar = None
    processors = []
    if progress:
        from tqdm import tqdm
        from transformers import LogitsProcessor, LogitsProcessorList

        bar = tqdm(total=length - 1, desc="sampling text", unit="token", disable=None, leave=False)

        class _Tick(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                bar.update(1)
                return scores

        processors = LogitsProcessorList([_Tick()])
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                             pad_token_id=bos if isinstance(bos, int) else 0, logits_processor=processors or None)
    if bar is not None:
        bar.close()
    return out[:, :length].cpu().contiguous()


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's name, shape and a strided sample of its values (up to 65536 per tensor):
    any checkpoint change shows, without hashing gigabytes."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 65536)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::step].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]
