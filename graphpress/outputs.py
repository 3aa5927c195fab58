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
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = ".graphpress"
STAGING = "graphpress-staging"
STAGING_MARK = ".graphpress-staging"  # inside a staging directory while it is one: what remove_stale may delete
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
    """What under ``out`` graphpress did not write: without a valid manifest, every entry; with one, every
    file (or link) it does not list, and every folder that cannot be read (its files cannot be checked)."""
    written = _manifest(out)
    if written is None:
        return sorted(p.name for p in out.iterdir())
    found: list[str] = []
    unreadable: list[str] = []
    for root, dirs, files in os.walk(out, onerror=lambda e: unreadable.append(str(e.filename))):
        rel = Path(root).relative_to(out)
        found += [str(rel / f) for f in files]
        found += [str(rel / d) for d in dirs if (Path(root) / d).is_symlink()]  # never followed
    listed = set(written)
    return sorted(unreadable) + sorted(f for f in found if f != MANIFEST and f not in listed)


def _manifest(out: Path) -> list[str] | None:
    """The files a graphpress manifest in ``out`` lists, or None when there is no valid one."""
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("writer") == "graphpress" else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool = False, protected: Iterable[Path] = ()) -> Iterator[Path]:
    """A staging directory that becomes ``out`` only if the block succeeds; removed on any exception."""
    protected = tuple(protected)
    check_output(out, force=force, protected=protected)
    created = _missing_parents(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.{STAGING}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # the umask's mode, like any directory the user makes (mkdtemp would make it 0700)
    try:
        (tmp / STAGING_MARK).touch()
        yield tmp
        (tmp / STAGING_MARK).unlink()
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
    """Put ``tmp`` in place of ``out``; an earlier output is set aside first and comes back if that fails.
    SIGINT and SIGTERM wait until the renames are done."""
    retired = None
    with _signals_deferred():
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            retired = out.parent / f".{out.name}.{RETIRED}-{os.getpid()}-{secrets.token_hex(4)}"
            out.rename(retired)
        try:
            tmp.rename(out)
        except BaseException:
            if retired is not None:
                retired.rename(out)
            raise
    if retired is not None:
        _remove_output(retired)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _remove_output(d: Path) -> bool:
    """Remove an earlier output: the files its manifest lists that are really there (relative paths inside
    ``d``, never through a link), then the folders they leave empty. Returns True (it always tried)."""
    present = {str(Path(root, f).relative_to(d)) for root, _, files in os.walk(d) for f in files}
    for f in (*(_manifest(d) or []), MANIFEST):
        if f in present and ".." not in Path(f).parts:
            with contextlib.suppress(FileNotFoundError):
                (d / f).unlink()
    for root, _, _ in sorted(os.walk(d), key=lambda w: len(Path(w[0]).parts), reverse=True):
        with contextlib.suppress(OSError):
            Path(root).rmdir()
    return True


def _write_manifest(d: Path) -> None:
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    (d / MANIFEST).write_text(json.dumps({"writer": "graphpress", "files": files}, indent=1))


def remove_stale(out: Path) -> list[Path]:
    """Remove staging (and retired) directories of ``out`` left by runs that were killed outright (their
    process is gone; a run on another machine sharing the folder would look gone too). A staging directory goes
    only while it holds graphpress's mark (a folder of the same name without it is left alone); a retired one
    loses only the files its manifest lists."""
    removed = []
    for kind, remove in ((STAGING, _remove_staging), (RETIRED, _remove_output)):
        prefix = f".{out.name}.{kind}-"  # then PID-random
        for d in out.parent.iterdir():
            pid = d.name[len(prefix):].split("-", 1)[0] if d.name.startswith(prefix) else ""
            if pid.isdecimal() and pid.isascii() and d.is_dir() and not d.is_symlink() and not _alive(int(pid)) \
                    and remove(d):
                removed.append(d)
    return removed


def _remove_staging(d: Path) -> bool:
    """Remove a staging directory, all of it graphpress's, if it carries the mark; whether it did."""
    if not (d / STAGING_MARK).is_file():
        return False
    shutil.rmtree(d, ignore_errors=True)
    return True


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
