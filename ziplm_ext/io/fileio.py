"""Atomic writes: a reader never sees a half-written file or directory, a failure leaves nothing behind.

:func:`atomic_write_bytes` writes one file; :func:`atomic_directory` builds a whole directory (a saved
model, a pruned family, a checkpoint) in a temporary sibling and swaps it into place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_directory"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name next to `path` for a writer to fill; on success it is synced and renamed
    to `path` (readers see the old file or the whole new one), on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _check_target(target: Path, overwrite: bool) -> None:
    """Raise if ``target`` may not be replaced: not a directory, or non-empty without ``overwrite``."""
    if not target.exists():
        return
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    if not overwrite and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted only after
    the swap (restored if the swap fails)."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # restore the previous contents
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build the directory ``target`` atomically.

    Yields a fresh, empty temporary directory next to ``target`` (same file system, so the final rename
    is atomic); write everything into it.  On normal exit it is renamed to ``target``; on an exception
    it is removed and ``target`` is left as it was.

    An existing ``target`` must be a directory (else :class:`NotADirectoryError`).  An empty one is
    always replaced; a non-empty one raises :class:`FileExistsError` unless ``overwrite=True``, in which
    case it is moved aside, replaced, and deleted only after the new directory is in place (restored if
    the swap fails).  The check runs before the body; the parent directory is created if missing.
    Every error is an :class:`OSError`.
    """
    target = Path(target)
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
