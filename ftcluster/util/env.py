"""Environment variables set for a while, then put back as they were."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ updated with `values` inside the block; on leaving it, each of those variables is
    restored to its previous value, or removed if it had none. Other variables are left alone."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
