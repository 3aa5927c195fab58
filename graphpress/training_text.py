"""Training text for recovery (graphpress.passes.distill): never the evaluation text, the held-out text of
another domain, nor the calibration windows.

Two sources, interleaved (the recipe's ``training`` section says how many windows come from each):
- **Text the teacher writes**: windows sampled from the uncompressed model (temperature 1, from its BOS token),
  the data-free distillation of LLM-QAT (Liu et al., 2023): it follows the teacher's own distribution over
  every domain it learned. Seeds start at ``SEED``, far from the calibration's (graphpress.calibration_text
  samples chunk ``c`` with seed ``c``), so no calibration window is trained on. Sampled in chunks of
  ``CHUNK`` windows on the fastest device present (a GPU samples a chunk of 512-token windows in seconds), each
  chunk kept in graphpress's cache.
- **Docstrings of installed packages**: the modules of site-packages (numpy, torch, transformers...), read with
  ``ast`` (nothing is imported), tests left out. Calibration reads only the standard library's docstrings and
  the evaluation text is ``pydoc_data``'s topics, so neither is here. Which packages are installed decides
  the text: the report says how many tokens came from where.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import site
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphpress import calibration_text as ct

log = logging.getLogger(__name__)

SEED = 1 << 20  # the calibration's generated windows use seeds 0, 1, ...: far below
CHUNK = 512  # windows sampled together (one generate call)
_SKIP = {"test", "tests", "testing", "__pycache__", "graphpress", "pydoc_data", "_vendor", "vendored"}


def site_packages() -> list[Path]:
    """The folders installed packages live in (this environment's, then the user's), existing ones only."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    out: list[Path] = []
    for p in [*paths, *([user] if user else [])]:
        path = Path(p)
        if path.is_dir() and path.resolve() not in {q.resolve() for q in out}:
            out.append(path)
    return out


def package_files() -> list[Path]:
    """The Python source files of installed packages (tests and graphpress itself left out), sorted."""
    out = []
    for root in site_packages():
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP and not d.endswith((".dist-info", ".egg-info")))
            out.extend(Path(folder) / f for f in files if f.endswith(".py") and not f.startswith("test_"))
    return sorted(set(out))


def package_windows(tokenizer: Any, n: int, length: int, seed: int = SEED) -> torch.Tensor:
    """``n`` windows of ``length`` tokens of installed packages' docstrings, files in an order fixed by
    ``seed``: [n, length] (fewer rows when the packages hold less text)."""
    files = package_files()
    random.Random(seed).shuffle(files)
    need = n * length
    ids: list[int] = []
    for path in files:
        text = "\n\n".join(ct.docstrings(path))
        if text:
            ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    rows = min(n, len(ids) // length)
    return torch.tensor(ids[: rows * length], dtype=torch.long).view(rows, length)


def training_windows(model: nn.Module, tokenizer: Any, windows: int, length: int, generated: int,
                     device: torch.device | str = "cpu", progress: bool = False
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The training set: ``generated`` windows the model writes and the rest installed packages' docstrings,
    interleaved; and where they came from (for the report)."""
    parts, origin = [], {}
    if generated:
        parts.append(ct.generated_windows(model, tokenizer, generated, length, SEED, progress, chunk=CHUNK,
                                          kind="training", device=device))
        origin["generated"] = {"windows": generated, "tokens": generated * length, "seed": SEED,
                               "sampling": "temperature 1 from BOS"}
    if windows - generated:
        docs = package_windows(tokenizer, windows - generated, length)
        parts.append(docs)
        origin["packages"] = {"windows": len(docs), "tokens": docs.numel(),
                              "text": "docstrings of installed packages (site-packages)"}
        if len(docs) < windows - generated:
            log.warning("installed packages hold %d windows of docstrings, not %d", len(docs), windows - generated)
    ids = ct.interleave(parts)
    origin.update(windows=len(ids), length=length, tokens=ids.numel(),
                  sha256=hashlib.sha256(ids.numpy().tobytes()).hexdigest())
    return ids, origin
