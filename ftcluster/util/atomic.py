"""Files and folders that appear whole or not at all."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename a completed `tmp` folder to `final`; an existing `final` is removed only after the swap."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old)
    else:
        tmp.replace(final)


def write_text(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a half-written file."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    tmp.replace(path)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write (a file or a folder); it takes `path`'s place only when the
    block completes, so an interrupted write leaves the old content, or nothing, never half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
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


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
