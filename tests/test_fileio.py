"""ziplm_ext.io.fileio: atomic file and directory writes."""

from __future__ import annotations

import os

import pytest

from ziplm_ext.io import fileio
from ziplm_ext.io.fileio import atomic_directory, atomic_write_bytes


def names(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert names(tmp_path) == ["f.bin"]


def test_new_directory_appears_only_on_success(tmp_path):
    target = tmp_path / "a" / "b" / "out"  # missing parents are created
    with atomic_directory(target) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir())
        assert tmp.parent == target.parent and tmp != target
        (tmp / "x.txt").write_text("x")
        assert not target.exists()  # nothing visible before the body ends
    assert target.is_dir() and (target / "x.txt").read_text() == "x"
    assert names(target.parent) == ["out"]  # no temporary left


def test_failure_removes_temp_and_keeps_target(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert names(tmp_path) == []

    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert names(tmp_path) == ["out"] and names(target) == ["old.txt"]


def test_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(target):
            pytest.fail("the body must not run")  # pragma: no cover
    assert names(target) == ["old.txt"]

    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(target) == ["new.txt"]  # old contents gone, not merged
    assert names(tmp_path) == ["out"]  # the moved-aside copy is deleted


def test_empty_existing_directory_is_replaced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("x")
    assert names(target) == ["x"] and names(tmp_path) == ["out"]


def test_target_that_is_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("file")
    for overwrite in (False, True):
        with pytest.raises(NotADirectoryError):
            with atomic_directory(target, overwrite=overwrite):
                pytest.fail("the body must not run")  # pragma: no cover
    assert target.read_text() == "file"


def test_failed_swap_restores_previous_contents(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:  # 1: target -> aside, 2: tmp -> target (fails), 3: restore
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="No space left"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert len(calls) == 3
    assert names(target) == ["old.txt"] and names(tmp_path) == ["out"]


def test_unwritable_parent_is_an_oserror(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("not a directory")
    with pytest.raises(OSError):
        with atomic_directory(parent / "out"):
            pytest.fail("the body must not run")  # pragma: no cover
