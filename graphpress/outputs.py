"""Output directories: graphpress replaces only what it wrote, and never leaves a half-written one.

An output directory is built in a staging directory beside it (``.OUT.graphpress-staging-PID-XXXX``) and
renamed into place only when the whole run succeeded. A finished output holds a manifest (``.graphpress``,
JSON: the files graphpress wrote there), which is what makes it replaceable by ``--force``:

- ``OUT`` does not exist, or is an empty directory: written.
- ``OUT`` holds an earlier graphpress output (every file in it is in its manifest): refused without
  ``force``; with ``force`` the new output takes its place, and the old one is removed only after the new one
  is complete (a failed run keeps the old output).
- ``OUT`` holds any file graphpress did not write, is a file, is the working directory or one of its parents,
  or is (or holds) one of the model's own directories: refused, with or without ``force``.

A run interrupted by SIGINT or SIGTERM removes its staging directory (``staged_output`` unwinds on every
exception); one killed outright leaves it, and the next run into the same ``OUT`` removes it once the process
that made it is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = ".graphpress"
STAGING = "graphpress-staging"
RETIRED = "graphpress-retired"


class OutputError(ValueError):
    """An output directory graphpress must not write to (or replace)."""


def check_output(out: Path, *, force: bool = False, protected: Iterable[Path] = ()) -> None:
    """Refuse ``out`` before any work starts; see the module docstring for the rules."""
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if cwd == target or target in cwd.parents:
        raise OutputError(f"refusing --out {out}: it is the working directory or one of its parents; "
                          "choose a new directory, e.g. --out out/compressed")
    for p in protected:
        p = p.resolve()
        if p == target or target in p.parents:
            raise OutputError(f"refusing --out {out}: it holds the model's own files ({p}); choose a new directory")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputError(f"refusing --out {out}: it exists and is not a directory; choose a new directory")
    entries = list(out.iterdir())
    if not entries:
        return
    foreign = _foreign_files(out)
    if foreign:
        raise OutputError(
            f"refusing --out {out}: it holds files graphpress did not write (e.g. {foreign[0]}); choose a new "
            "directory (--force only replaces an earlier graphpress output)"
        )
    if not force:
        raise OutputError(f"output directory {out} exists and is not empty (an earlier graphpress output): "
                          "pass --force to replace it, or choose another directory")


def _foreign_files(out: Path) -> list[str]:
    """Paths under ``out`` that its manifest does not list (all of them when there is no manifest)."""
    written = set(_manifest(out))
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir() or p.is_symlink())
    return [f for f in found if f != MANIFEST and f not in written]


def _manifest(out: Path) -> list[str]:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    files = data.get("files") if isinstance(data, dict) and data.get("writer") == "graphpress" else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool = False, protected: Iterable[Path] = ()) -> Iterator[Path]:
    """A staging directory that becomes ``out`` only if the block succeeds; removed on any exception."""
    protected = tuple(protected)
    check_output(out, force=force, protected=protected)
    created = _missing_parents(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{STAGING}-{os.getpid()}-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; an output is an ordinary directory
        yield tmp
        _write_manifest(tmp)
        check_output(out, force=force, protected=protected)  # nothing moved in while we worked
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only the staging directory this run made
        for d in created:  # parents this run created, innermost first, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _swap(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        tmp.rename(out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.{RETIRED}-{os.getpid()}-", dir=out.parent))
    retired.rmdir()
    out.rename(retired)
    tmp.rename(out)
    _remove_output(retired)


def _remove_output(d: Path) -> None:
    """Remove an earlier output: the files its manifest lists, then the directories they leave empty."""
    for f in (*_manifest(d), MANIFEST):
        with contextlib.suppress(FileNotFoundError):
            (d / f).unlink()
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        d.rmdir()


def _write_manifest(d: Path) -> None:
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    (d / MANIFEST).write_text(json.dumps({"writer": "graphpress", "files": files}, indent=1))


def remove_stale(out: Path) -> list[Path]:
    """Remove staging (and retired) directories of ``out`` left by runs that were killed outright."""
    removed = []
    for kind, remove in ((STAGING, shutil.rmtree), (RETIRED, _remove_output)):
        prefix = f".{out.name}.{kind}-"  # then PID-random
        for d in out.parent.glob(prefix + "*"):
            pid = d.name[len(prefix):].split("-", 1)[0]
            if d.is_dir() and not d.is_symlink() and pid.isdigit() and not _alive(int(pid)):
                remove(d)  # a staging directory is all graphpress's; a retired one, its manifest's files
                removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _missing_parents(d: Path) -> list[Path]:
    missing = []
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    return missing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
