"""A worker entry whose module has a preload(), for the early start of launcher=local's ranks: each rank notes,
in the run's folder, when it preloaded and when it ran, under its process id."""

import os
import time

from ftcluster.observe.placement import REPORT_DIR_ENV


def preload():
    _note("preloaded")


def run(payload):
    _note("ran")


def _note(what: str) -> None:
    with open(os.path.join(os.environ[REPORT_DIR_ENV], f"{what}-{os.environ['RANK']}-{os.getpid()}"), "w") as f:
        f.write(str(time.time()))
