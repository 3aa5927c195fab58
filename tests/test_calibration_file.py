"""A user's calibration data: ids or text told apart, rows cut (never padded for causal LMs), padded under a mask
for encoders, ids outside the vocabulary refused naming the line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from graphpress import calibration_file as cf


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "calib.txt"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_integer_lines_are_ids_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path, "1 2 3\n\n  4\t5  \n-1 +7\n")
    cal = cf.read_calibration(path)
    assert cal.format == "ids" and cal.ids == [[1, 2, 3], [4, 5], [-1, 7]] and cal.lines == [1, 3, 4]
    assert cal.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and cal.origin == str(path.resolve())


def test_one_line_that_is_not_integers_makes_the_file_text(tmp_path: Path) -> None:
    cal = cf.read_calibration(_write(tmp_path, "1 2 3\n4, 5\n6\n"))
    assert cal.format == "text" and cal.ids is None and cal.text == "1 2 3\n4, 5\n6\n"
    assert cal.why_text.startswith("line 2 ('4, 5')")


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n   \n\t\n", "is empty"),
    (b"\xff\xfe\x00 1 2", "is not UTF-8 text"),
])
def test_unreadable_files_are_refused(tmp_path: Path, content: str | bytes, message: str) -> None:
    with pytest.raises(cf.CalibrationFileError, match=message):
        cf.read_calibration(_write(tmp_path, content))


def test_missing_file_and_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(cf.CalibrationFileError, match="does not exist"):
        cf.read_calibration(tmp_path / "nope.txt")
    with pytest.raises(cf.CalibrationFileError, match="is not a file"):
        cf.read_calibration(tmp_path)


def test_rows_from_python_are_checked_and_hashed_like_the_file_they_would_be(tmp_path: Path) -> None:
    cal = cf.read_calibration([[1, 2], (3,)])
    assert cal.ids == [[1, 2], [3]]
    assert cal.sha256 == cf.read_calibration(_write(tmp_path, "1 2\n3\n")).sha256
    assert cf.read_calibration(torch.tensor([[5, 6]])).ids == [[5, 6]]
    for bad in ([], [[]], [[1, 2.5]], [[True]], ["1 2"]):
        with pytest.raises(cf.CalibrationFileError):
            cf.read_calibration(bad)


def test_ids_outside_the_vocabulary_name_the_line(tmp_path: Path) -> None:
    cal = cf.read_calibration(_write(tmp_path, "1 2\n\n3 320\n"))
    cf.check_vocabulary(cal, 321, "m")
    with pytest.raises(cf.CalibrationFileError, match=r"calib.txt line 3: token id 320 .* model m \(ids 0..319\)"):
        cf.check_vocabulary(cal, 320, "m")
    with pytest.raises(cf.CalibrationFileError, match="row 1: token id -1"):
        cf.check_vocabulary(cf.read_calibration([[-1]]), 320, "m")


def test_causal_rows_are_cut_never_padded_and_batched_by_length() -> None:
    rows = [list(range(10)), list(range(4)), list(range(6)), list(range(4)), list(range(3))]
    batches, cut = cf.causal_batches(rows, n=4, length=6, batch=8)  # the fifth row is beyond n
    assert cut == 1
    assert [tuple(b.shape) for b in batches] == [(2, 6), (2, 4)]
    assert torch.equal(batches[0], torch.tensor([list(range(6)), list(range(6))]))  # row 1 cut to 6 tokens
    assert [tuple(b.shape) for b in cf.causal_batches(rows[:1] * 5, 5, 6, batch=2)[0]] == [(2, 6), (2, 6), (1, 6)]


def test_encoder_rows_are_padded_under_a_mask_and_cut() -> None:
    batches, cut = cf.padded_batches([[5, 6, 7, 8], [9]], max_tokens=3, pad_id=1)
    assert len(batches) == 1 and cut == 1
    ids, mask = batches[0]
    assert ids.tolist() == [[5, 6, 7], [9, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert [b[0].shape for b in cf.padded_batches([[1]] * 33, 3, 0)[0]] == [(32, 1), (1, 1)]


def test_text_windows_from_the_start_and_a_short_text_as_one_window() -> None:
    assert cf.text_windows(list(range(10)), n=4, length=3, origin="f").tolist() == [[0, 1, 2], [3, 4, 5],
                                                                                    [6, 7, 8]]
    assert cf.text_windows(list(range(10)), n=2, length=3, origin="f").shape == (2, 3)
    assert cf.text_windows([7, 8], n=4, length=3, origin="f").tolist() == [[7, 8]]
    with pytest.raises(cf.CalibrationFileError, match="holds no tokens"):
        cf.text_windows([], 4, 3, "f")
