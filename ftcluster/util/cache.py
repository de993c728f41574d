"""The ftcluster cache (FTCLUSTER_CACHE, default ~/.cache/ftcluster): converted models, prepared sets, and entries
kept by the content they were made from (a model folder's facts, small random-init weights)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("FTCLUSTER_CACHE") or Path.home() / ".cache" / "ftcluster")


def content_key(folder: Path, files: list[Path], settings: tuple, packages: tuple[str, ...]) -> str:
    """A key (32 hex digits) for what is made from `files` (under `folder`: their paths there and their bytes),
    `settings`, and the installed versions of `packages`."""
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr((settings, [importlib.metadata.version(name) for name in packages])).encode())
    return h.hexdigest()[:32]
