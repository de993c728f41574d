"""The store of prepared sets: one folder per fingerprint, shared by every run, eval and sweep trial.

`<data.prepared_dir>/<fingerprint>/` (default `<FTCLUSTER_CACHE or ~/.cache/ftcluster>/prepared`; on a
cluster, a path every node reads) holds train/, eval/, eval_generate.jsonl and stats.json. The fingerprint
covers everything that shapes the rows (data files' bytes, tokenizer, template, data.* and the lengths), so a
matching folder is the set a new preparation would write, and is reused as it is.

A set is built in a private folder beside its place and renamed into place when complete, stats.json
written last: an interrupted preparation leaves no folder under the fingerprint's name, and a reader never
sees half a set. A lock per fingerprint keeps two preparers of the same set (two runs, a sweep's trials)
from doing the work twice: the second waits, then reuses.

For a caller (the driver, `ftcluster eval`, a sweep), the whole API is:
    entry = store.entry(data.prepared_dir, fingerprint)   # where the set lives
    store.complete(entry, fingerprint)                      # its stats when it is there and whole, else None
    prepare.prepare(cfg, tokenizer, out_dir)                # builds it if needed; out_dir links to it
    prepare.prepared_key(cfg, tokenizer)                    # the key, without preparing anything
    reuse.reuse_prepared(cfg, tokenizer_facts, out_dir)     # the set if it is there, without the tokenizer
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from ftcluster.util.atomic import PENDING_PREFIX
from ftcluster.util.cache import cache_root


def root(prepared_dir: str | None) -> Path:
    if prepared_dir:
        return Path(prepared_dir).expanduser().resolve()
    return cache_root().expanduser().resolve() / "prepared"


def entry(prepared_dir: str | None, fingerprint: str) -> Path:
    return root(prepared_dir) / fingerprint[:32]


def complete(folder: Path, fingerprint: str) -> dict | None:
    """The stats of the set in `folder` when it is whole and made for `fingerprint`."""
    stats_file = folder / "stats.json"
    if not stats_file.is_file():
        return None
    stats = json.loads(stats_file.read_text())
    return stats if stats.get("fingerprint") == fingerprint else None


@contextmanager
def locked(folder: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the set's lock; `on_wait` is called first when another process holds it (a sweep's trials, two
    runs started together), so that a log says why nothing seems to happen."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.with_name(f"{folder.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def building(folder: Path) -> Iterator[Path]:
    """A private folder to build the set in (call under `locked`); it becomes `folder` when the block completes,
    and is removed when it raises."""
    tmp = folder.with_name(f"{PENDING_PREFIX}{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if folder.exists():  # an incomplete set of an older layout, or one left by a crash before the rename
            shutil.rmtree(folder)
        tmp.replace(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link(out_dir: Path, folder: Path) -> None:
    """Make `out_dir` (a run's data/ folder) point at the set; what was there before was such a link or a set
    an earlier version prepared in place, both ftcluster's own."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and out_dir.resolve() == folder.resolve():
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{PENDING_PREFIX}{out_dir.name}-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(folder.resolve(), target_is_directory=True)
    if out_dir.is_dir() and not out_dir.is_symlink():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
