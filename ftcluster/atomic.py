"""Folders that appear whole or not at all."""

from __future__ import annotations

import shutil
from pathlib import Path


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
