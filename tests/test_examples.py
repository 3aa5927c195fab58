"""The examples/ directory runs as documented (each ``python examples/NAME.py`` checks its own claims)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted(p for p in (Path(__file__).parents[1] / "examples").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(example), run_name="__main__")
    assert capsys.readouterr().out.strip()  # each example reports what it showed
