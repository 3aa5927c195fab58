"""Calibration data a user gives (``--calibration FILE``, ``compress(calibration=...)``) instead of the
built-in text: token ids, or plain text for a model with a tokenizer.

    FILE, every non-empty line whitespace-separated integers  ->  token ids, one window (sentence) per line
    FILE, any other text                                      ->  text, tokenized and cut like the built-in text
    [[ids], [ids], ...] from Python                           ->  token ids, one window (sentence) per row

Token ids are used as given (no special tokens added). Causal LMs: the first ``windows`` rows, each cut to the
recipe's ``length`` (shortened to the model's context); a shorter row stays shorter (a causal LM calibrates
without an attention mask, so padding would feed pad tokens into the statistics); rows of equal length are
batched ``batch`` at a time. Encoders: the first ``sentences`` rows, cut to the protocol's sentence length,
padded with the model's pad id under an attention mask, 32 per batch. Fewer rows than the recipe asks for are
used as they are, and the report says how many.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_IDS_LINE = re.compile(r"[+-]?\d+(?:\s+[+-]?\d+)*")


class CalibrationFileError(ValueError):
    """A calibration file that is missing, empty, unreadable, or holds ids outside the vocabulary."""


@dataclass(frozen=True)
class UserCalibration:
    origin: str  # the file's absolute path, or a note that the ids came from Python
    sha256: str  # of the file's bytes; for ids from Python, of the rows written one per line
    ids: list[list[int]] | None  # token ids, one window (sentence) per row; None for text
    lines: list[int]  # the line (row) number of each row of ids, for messages
    text: str | None  # plain text; None for ids
    why_text: str = ""  # for text: the first line that is not integers
    from_file: bool = True

    @property
    def format(self) -> str:
        return "ids" if self.ids is not None else "text"

    def to_json(self) -> dict[str, object]:
        return {"source": self.origin, "sha256": self.sha256, "format": self.format}


def read_calibration(given: str | Path | Sequence[Sequence[int]] | torch.Tensor) -> UserCalibration:
    """Read a calibration file (token ids or text, see the module docstring) or take rows of ids from Python."""
    if isinstance(given, (str, Path)):
        return _read_file(Path(given))
    rows = given.tolist() if isinstance(given, torch.Tensor) else given
    if not isinstance(rows, Sequence) or not rows:
        raise CalibrationFileError("calibration= must be a file path or a non-empty list of token id lists")
    ids = []
    for i, row in enumerate(rows, 1):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not row or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise CalibrationFileError(f"calibration= row {i} is not a non-empty list of integer token ids")
        ids.append(list(row))
    text = "".join(" ".join(map(str, r)) + "\n" for r in ids)
    return UserCalibration("token ids given to compress()", hashlib.sha256(text.encode()).hexdigest(), ids,
                           list(range(1, len(ids) + 1)), None, from_file=False)


def _read_file(path: Path) -> UserCalibration:
    if not path.exists():
        raise CalibrationFileError(f"calibration file {path} does not exist")
    if not path.is_file():
        raise CalibrationFileError(f"calibration file {path} is not a file")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise CalibrationFileError(f"cannot read calibration file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CalibrationFileError(f"calibration file {path} is not UTF-8 text (byte {e.start}): give token ids, "
                                   "one window per line, or plain text") from e
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise CalibrationFileError(f"calibration file {path} is empty: give token ids, one window per line")
    origin, digest = str(path.resolve()), hashlib.sha256(data).hexdigest()
    not_ids = next(((n, line) for n, line in numbered if not _IDS_LINE.fullmatch(line)), None)
    if not_ids is not None:
        n, line = not_ids
        shown = line if len(line) <= 40 else line[:39] + "…"
        return UserCalibration(origin, digest, None, [], text, f"line {n} ({shown!r}) is not whitespace-separated "
                                                               "integers")
    return UserCalibration(origin, digest, [[int(t) for t in line.split()] for _, line in numbered],
                           [n for n, _ in numbered], None)


def check_vocabulary(cal: UserCalibration, vocab: int, model: str) -> None:
    """Refuse a token id outside ``0 .. vocab - 1``, naming the line."""
    assert cal.ids is not None
    for row, line in zip(cal.ids, cal.lines, strict=True):
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            where = f"calibration file {cal.origin} line {line}" if cal.from_file else f"calibration= row {line}"
            raise CalibrationFileError(f"{where}: token id {bad} is outside the vocabulary of model {model} "
                                       f"(ids 0..{vocab - 1})")


def causal_batches(rows: list[list[int]], n: int, length: int, batch: int) -> tuple[list[torch.Tensor], int]:
    """The first ``n`` rows cut to ``length`` tokens, equal lengths batched ``batch`` at a time:
    [b, length_i] each; and how many rows were cut."""
    windows = [row[:length] for row in rows[:n]]
    by_length: dict[int, list[list[int]]] = {}
    for w in windows:
        by_length.setdefault(len(w), []).append(w)
    batches = [torch.tensor(group[i : i + batch]) for group in by_length.values()
               for i in range(0, len(group), batch)]
    return batches, sum(len(row) > length for row in rows[:n])


def padded_batches(rows: list[list[int]], max_tokens: int, pad_id: int, batch: int = 32
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Rows cut to ``max_tokens`` and padded to the longest in their batch: (ids [b, s], mask [b, s]) each;
    and how many rows were cut."""
    out = []
    for i in range(0, len(rows), batch):
        chunk = [row[:max_tokens] for row in rows[i : i + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        out.append((ids, mask))
    return out, sum(len(row) > max_tokens for row in rows)


def text_windows(ids: Sequence[int], n: int, length: int, origin: str) -> torch.Tensor:
    """Up to ``n`` windows of ``length`` tokens from the start of the user's text: [k, length]; a text shorter
    than one window is one window of all its tokens."""
    if not ids:
        raise CalibrationFileError(f"calibration file {origin} holds no tokens")
    k = min(n, len(ids) // length)
    if k == 0:
        return torch.tensor([list(ids)])
    return torch.tensor(list(ids[: k * length])).view(k, length)
