"""What graphpress derives once and keeps: a GGUF model converted to safetensors, calibration text a model wrote.

Location: ``$GRAPHPRESS_CACHE``, else ``$XDG_CACHE_HOME/graphpress``, else ``~/.cache/graphpress``. Every entry
is a folder ``<kind>/<key>`` that graphpress alone writes: it is built in a temporary sibling and renamed into
place, so a run killed midway leaves no half entry, and two runs building the same entry at once both finish
(the second one's copy is dropped). Deleting the folder is always safe: graphpress rebuilds what it needs.
A cache that cannot be written (read-only home) is skipped with a log line; nothing fails for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = ".graphpress-cache-entry"  # in every entry graphpress built


def cache_dir() -> Path:
    if os.environ.get("GRAPHPRESS_CACHE"):
        return Path(os.environ["GRAPHPRESS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graphpress"


def key(*parts: object) -> str:
    """A short stable name for an entry from everything it depends on."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:24]


def cached(kind: str, name: str, build: Callable[[Path], None]) -> Path | None:
    """The folder of entry ``kind/name``, built by ``build(folder)`` on first use; None when the cache cannot
    be written (the caller then works without it)."""
    final = cache_dir() / kind / name
    if final.is_dir():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    except OSError as e:
        log.info("cache %s is not writable (%s): working without it", final.parent, e)
        return None
    try:
        build(tmp)
        (tmp / MARKER).touch()  # what prune may ever remove
        try:
            tmp.rename(final)
        except OSError:  # another run built it first
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune(kind: str, prefix: str, keep: str) -> None:
    """Remove the entries ``kind/<prefix>*`` other than ``keep``: what an older graphpress built for the same
    model (its exports are keyed by graphpress's code, and would otherwise pile up with every upgrade)."""
    for entry in (cache_dir() / kind).glob(f"{prefix}*"):
        if entry.name != keep and (entry / MARKER).is_file():
            shutil.rmtree(entry, ignore_errors=True)


def cached_json(kind: str, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON value, kept as entry ``kind/name`` (computed every time when the cache cannot be
    written)."""
    value: list[Any] = []

    def build(folder: Path) -> None:
        value.append(compute())
        (folder / "value.json").write_text(json.dumps(value[0]))

    folder = cached(kind, name, build)
    if value:
        return value[0]
    if folder is None:
        return compute()
    return json.loads((folder / "value.json").read_text())


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of graphpress's own source: an entry that graphpress's code computed (an export) is rebuilt after
    any change to it."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:24]


def file_fingerprint(paths: Iterable[Path]) -> str:
    """Names, sizes and modification times: enough to notice a replaced file without reading it."""
    stats = []
    for p in sorted(paths):
        with contextlib.suppress(OSError):
            s = p.stat()
            stats.append(f"{p.resolve()}:{s.st_size}:{s.st_mtime_ns}")
    return key(*stats)
