"""An entry named by its module and function, imported where it runs.

The driver hands launchers the worker entry this way, so that it need not import the entry's module (torch,
transformers, DeepSpeed: seconds) before it starts the processes that run it, and a process that will run it
can import it (preload) while it waits for its payload. Picklable as two strings.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class EntryByName:
    module: str
    name: str

    def preload(self) -> None:
        """The entry's module imported, and its own `preload()` run where it has one (what its libraries import
        only on first use)."""
        getattr(importlib.import_module(self.module), "preload", lambda: None)()

    def __call__(self, *args):
        return getattr(importlib.import_module(self.module), self.name)(*args)
