"""Seeded random weights for a config-only model folder (model.init=random), written once per run by the driver
so that every strategy and world size starts from the very same weights (which is what lets a ZeRO-3 run be
compared with a single-process one).

Small models (the test and benchmark models, up to CACHE_LIMIT_BYTES) are also kept in the cache, keyed by
everything that decides the weights: the folder's files, the seed, and the torch and transformers versions.
A later run copies them instead of building the model: building it costs the driver the import of
transformers' modeling stack and a model's initialisation, seconds on the path to a run's first step that the
ranks, which import that stack themselves, are meanwhile waiting on. Big models are written and not kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ftcluster.util.cache import cache_root, content_key
from ftcluster.util.atomic import publishing, replacing

CACHE_LIMIT_BYTES = 64 * 2**20


def materialize_random_init(model_dir: str, out_dir: Path, seed: int, trust_remote_code: bool = False) -> str:
    """`out_dir` holding `model_dir`'s config and tokenizer with weights drawn from `seed`; kept as it is when
    it already holds them (a resumed run's)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    cached = _cache_entry(Path(model_dir), seed, trust_remote_code)
    if cached is not None and (cached / "config.json").is_file():
        with replacing(out_dir) as tmp:
            shutil.copytree(cached, tmp)
        return str(out_dir)
    from ftcluster.train.model import write_random_init  # torch and transformers' modeling stack: seconds

    with replacing(out_dir) as tmp:
        write_random_init(model_dir, tmp, seed, trust_remote_code)
    if cached is not None and _size(out_dir) <= CACHE_LIMIT_BYTES:
        try:
            with publishing(cached) as tmp:
                shutil.copytree(out_dir, tmp, dirs_exist_ok=True)
        except OSError:  # a cache that cannot be written (read-only, full): built again next time
            pass
    return str(out_dir)


def _cache_entry(model_dir: Path, seed: int, trust_remote_code: bool) -> Path | None:
    """Where the weights for this folder and seed are kept; None when the folder is too big to be a
    config-only one worth keeping (it holds weights, or a model's worth of files)."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if sum(p.stat().st_size for p in files) > CACHE_LIMIT_BYTES:
        return None
    return cache_root() / "random_init" / content_key(model_dir, files, (seed, trust_remote_code),
                                                      ("torch", "transformers"))


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
