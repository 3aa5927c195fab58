"""What compress keeps in graphpress's cache: the uncompressed export and its perplexity, read back by the next
recipe on the same model; a changed model gets its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphpress import compress as compress_module
from graphpress.compress import compress


def test_the_reference_export_and_its_evaluation_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHPRESS_CACHE", str(tmp_path / "cache"))
    exports = []
    real = compress_module.export_onnx

    def counting(program, path, **kw):  # noqa: ANN001, ANN003, ANN202
        exports.append(Path(path))
        return real(program, path, **kw)

    monkeypatch.setattr(compress_module, "export_onnx", counting)
    first = compress("tiny-llama", tmp_path / "a", "w8-rtn", progress=False)
    assert len(exports) == 2  # the reference and the compressed program
    second = compress("tiny-llama", tmp_path / "b", "w4-rtn", progress=False)
    assert len(exports) == 3  # only the compressed program
    assert second["evaluation"]["before"] == first["evaluation"]["before"]
    assert second["bytes"]["onnx_file_before"] == first["bytes"]["onnx_file_before"]
    assert second["latency"]["before"]["median_ms"] > 0  # latency is always measured in the run
    cached = list((tmp_path / "cache" / "reference").iterdir())
    assert len(cached) == 1 and not any(p.is_relative_to(cached[0]) for p in exports[1:])
    # nothing of the cache is in the outputs, nothing of the outputs in the cache
    assert not (tmp_path / "a" / "reference").exists()
