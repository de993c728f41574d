"""launcher=local: a Ray cluster started inside this process, then the same placement as launcher=ray."""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from ftcluster.launch import ray as ray_launch


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    ray_launch.connect(address=None)
    ray_launch.run(entry, payload, cfg)

