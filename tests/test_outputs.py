"""Output directories: graphpress replaces only what it wrote, refuses the rest, and never half-writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from graphpress.outputs import (
    MANIFEST,
    STAGING,
    STAGING_MARK,
    OutputError,
    check_output,
    remove_stale,
    staged_output,
)


def _write(out: Path, files: dict[str, str], **kwargs: object) -> None:
    with staged_output(out, **kwargs) as tmp:  # type: ignore[arg-type]
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def test_new_output_has_a_manifest_and_ordinary_permissions(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    _write(out, {"model.onnx": "1", "sub/x.json": "2"})
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.onnx", "sub"]
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode == 0o777 & ~_umask()
    assert not [p for p in tmp_path.rglob(f"*{STAGING}*")]


def test_force_replaces_only_an_earlier_output_and_a_failure_keeps_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, {"model.onnx": "old", "extra.txt": "old"})
    with pytest.raises(OutputError, match="pass --force"):
        _write(out, {"model.onnx": "new"})
    with pytest.raises(RuntimeError, match="boom"), staged_output(out, force=True) as tmp:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("boom")
    assert (out / "model.onnx").read_text() == "old"  # the failed run kept the old output
    _write(out, {"model.onnx": "new"}, force=True)
    assert (out / "model.onnx").read_text() == "new" and not (out / "extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_user_files_are_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, {"model.onnx": "mine"})
    (out / "notes.txt").write_text("user data")  # a user file added to an earlier output
    for force in (False, True):
        with pytest.raises(OutputError, match=r"did not write \(e.g. notes.txt\)"):
            check_output(out, force=force)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.py").write_text("x")
    with pytest.raises(OutputError, match="did not write"):
        check_output(plain, force=True)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output(afile, force=True)


def test_working_directory_parents_and_model_directories_are_refused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (Path("."), Path(".."), work, tmp_path):
        for force in (False, True):
            with pytest.raises(OutputError, match="working directory or one of its parents"):
                check_output(out, force=force)
    with pytest.raises(OutputError, match="model's own files"):
        check_output(Path("model"), force=True, protected=[Path("model")])
    check_output(Path("model/compressed"), protected=[Path("model")])  # a new directory inside is fine


def test_stale_staging_of_a_killed_run_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = tmp_path / f".out.{STAGING}-999999999-abc"  # no such pid
    dead.mkdir()
    (dead / STAGING_MARK).touch()  # as staged_output marks it
    (dead / "model.onnx").write_text("half")
    alive = tmp_path / f".out.{STAGING}-{os.getpid()}-abc"  # a run still going: left alone
    alive.mkdir()
    (alive / STAGING_MARK).touch()
    other = tmp_path / ".out.mine"  # not graphpress's
    other.mkdir()
    lookalike = tmp_path / f".out.{STAGING}-999999998-abc"  # the name, but not graphpress's mark: left alone
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("user data")
    assert remove_stale(out) == [dead]
    assert not dead.exists() and alive.exists() and other.exists()
    assert (lookalike / "notes.txt").read_text() == "user data"
    _write(out, {"model.onnx": "1"})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_users_own_dotfile_or_a_forged_manifest_removes_nothing(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / MANIFEST).write_text("my notes")  # the name, but not a graphpress manifest
    with pytest.raises(OutputError, match="did not write"):
        check_output(mine, force=True)
    out = tmp_path / "out"
    _write(out, {"model.onnx": "old"})
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    (out / MANIFEST).write_text('{"writer": "graphpress", "files": ["model.onnx", "../victim.txt", ""]}')
    _write(out, {"model.onnx": "new"}, force=True)
    assert victim.read_text() == "user data" and (out / "model.onnx").read_text() == "new"


def test_a_failed_swap_puts_the_earlier_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    _write(out, {"model.onnx": "old"})
    rename = Path.rename

    def failing(self: Path, target: Path) -> Path:
        if STAGING in self.name:
            raise OSError("disk full")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        _write(out, {"model.onnx": "new"}, force=True)
    monkeypatch.undo()
    assert (out / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
