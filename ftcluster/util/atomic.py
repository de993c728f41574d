"""Files and folders that appear whole or not at all.

Everything written for another process, a later run or a resume to read (checkpoints, final/, caches,
stats, reports, rewritten metrics) is written under a hidden name beside its destination and renamed into
place: a rename within a folder is atomic, so a reader, or a run resumed after a crash, sees the old
content or the new, never half of either. Every such write in the package goes through here.

A rename is atomic for readers, not against a power loss: the file system may persist the rename before the
data. Checkpoints are therefore made durable (fsync of every file and folder before the rename, of the parent
after: `durable_swap`); the other writes here are cheap to redo and skip the cost.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


# Hidden names beside a destination: its pending version while written, and the version it replaces while swapped.
PENDING_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def pending(path: Path) -> Path:
    """Where `path` is written before it is complete: hidden beside it, so nothing ever reads it."""
    return path.with_name(f"{PENDING_PREFIX}{path.name}")


def begin_folder(path: Path) -> Path:
    """The empty pending folder of `path` (whatever a crash left there is discarded). For writes that several
    processes share: one begins, all write into it, one completes it with swap_into_place."""
    tmp = pending(path)
    _remove(tmp)
    tmp.mkdir(parents=True)
    return tmp


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename a completed `tmp` folder to `final`; an existing `final` is removed only after the swap."""
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old)
    else:
        tmp.replace(final)


def fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then every folder (deepest first), forced to stable storage."""
    folders = []
    for root, _, files in os.walk(folder):
        folders.append(root)
        for name in files:
            fsync_path(Path(root) / name)
    for root in reversed(folders):
        fsync_path(Path(root))


def fsync_path(path: Path) -> None:
    """A file's or a folder's content (a folder's: its entries, e.g. a completed rename) on stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_swap(tmp: Path, final: Path) -> None:
    """swap_into_place that survives a power loss: `tmp`'s files and folders synced before the rename, the
    parent after it, so that after a crash `final` is either absent (or the old one) or complete."""
    fsync_tree(tmp)
    swap_into_place(tmp, final)
    fsync_path(final.parent)


def write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a half-written file."""
    with replacing(path) as tmp:
        tmp.write_text(text)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write (a file or a folder); it takes `path`'s place only when the
    block completes, so an interrupted write leaves the old content, or nothing, never half a file."""
    tmp = pending(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir():
        swap_into_place(tmp, path)
    else:
        tmp.replace(path)


@contextmanager
def publishing(folder: Path) -> Iterator[Path]:
    """A folder of this process's own to write; when the block completes it becomes `folder` unless another
    process published a complete one first, which is kept: for content that is the same whoever computes it
    (a cache entry), written by processes that take no lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{PENDING_PREFIX}{folder.name}-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, folder)
        except OSError:  # `folder` exists and is not empty: the other writer's copy stays
            pass
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
