"""Compression passes, one file per transformation family. ``PASSES`` maps a recipe name to its class."""

from __future__ import annotations

from graphpress.passes.base import Pass, PassContext, PassError, PassResult, Selection

PASSES: dict[str, type[Pass]] = {}

__all__ = ["PASSES", "Pass", "PassContext", "PassError", "PassResult", "Selection"]
