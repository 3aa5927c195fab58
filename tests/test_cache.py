"""graphpress.cache: an entry is built once, atomically, and a cache that cannot be written is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphpress import cache


@pytest.fixture(autouse=True)
def _cache_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRAPHPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_entry_is_built_once_and_then_read(tmp_path: Path) -> None:
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "x.txt").write_text("built")

    first = cache.cached("kind", "k1", build)
    second = cache.cached("kind", "k1", build)
    assert first == second == tmp_path / "cache" / "kind" / "k1" and len(calls) == 1
    assert (first / "x.txt").read_text() == "built"
    assert calls[0] != first  # built beside the entry, renamed into place


def test_a_failed_build_leaves_nothing_and_raises(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        cache.cached("kind", "k2", build)
    assert list((tmp_path / "cache" / "kind").iterdir()) == []


def test_an_entry_another_run_built_first_is_kept(tmp_path: Path) -> None:
    final = tmp_path / "cache" / "kind" / "k3"

    def build(folder: Path) -> None:  # the other run finishes while this one builds
        final.mkdir(parents=True)
        (final / "x.txt").write_text("theirs")
        (folder / "x.txt").write_text("ours")

    assert cache.cached("kind", "k3", build) == final and (final / "x.txt").read_text() == "theirs"
    assert [p.name for p in final.parent.iterdir()] == ["k3"]


def test_an_unwritable_cache_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GRAPHPRESS_CACHE", str(blocker / "cache"))
    assert cache.cached("kind", "k4", lambda folder: None) is None


def test_keys_and_fingerprints_change_with_what_they_name(tmp_path: Path) -> None:
    assert cache.key("a", 1) == cache.key("a", 1) != cache.key("a", 2)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"1")
    before = cache.file_fingerprint([f])
    f.write_bytes(b"22")
    assert cache.file_fingerprint([f]) != before


def test_prune_removes_the_other_entries_of_a_prefix_only(tmp_path: Path) -> None:
    for name in ("m1-old", "m1-new", "m2-old"):
        cache.cached("reference", name, lambda folder: None)
    cache.prune("reference", "m1-", keep="m1-new")
    assert sorted(p.name for p in (tmp_path / "cache" / "reference").iterdir()) == ["m1-new", "m2-old"]


def test_prune_never_removes_a_folder_graphpress_did_not_build(tmp_path: Path) -> None:
    theirs = tmp_path / "cache" / "reference" / "m1-theirs"
    theirs.mkdir(parents=True)
    cache.cached("reference", "m1-new", lambda folder: None)
    cache.prune("reference", "m1-", keep="m1-new")
    assert theirs.is_dir()
