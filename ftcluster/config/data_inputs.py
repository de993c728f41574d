"""Config checks of the data a run reads: data.path, data.eval_path and a mixture's data.sources, each of
which may be a file, a list of files, a glob or a folder of shards (ftcluster.data.sources resolves them)."""

from __future__ import annotations

import glob
import math
from pathlib import Path

from omegaconf import DictConfig

from ftcluster.config.schema import CHOICES
from ftcluster.errors import ConfigError
from ftcluster.stages.registry import STAGES


def check_data_inputs(cfg: DictConfig) -> None:
    data = cfg.data
    if data.path is None and not data.sources:
        raise ConfigError("data.path", "no training data: set data.path=FILE (JSONL, JSON, Parquet, .jsonl.gz, a "
                                       "list, a glob or a folder of shards) or a mixture in data.sources")
    inputs = [("data.path", data.path), ("data.eval_path", data.eval_path)]
    for i, source in enumerate(data.sources):
        key = f"data.sources[{i}]"
        if not source.path:
            raise ConfigError(f"{key}.path", "set a file, a list of files, a glob or a folder of shards")
        if not (math.isfinite(source.weight) and source.weight > 0):
            raise ConfigError(f"{key}.weight", f"got {source.weight}; it must be a positive number (1.0: every "
                                               f"example once, 0.5: half of them, 2.0: each twice)")
        source_format = source.format or data.format
        formats = STAGES[cfg.stage.name].formats
        if source_format not in formats:
            raise ConfigError(f"{key}.format", f"stage={cfg.stage.name} trains on {', '.join(formats)} data, not "
                                               f"{source_format!r} (choices: {', '.join(CHOICES['data.format'])})")
        inputs.append((f"{key}.path", source.path))
    for key, value in inputs:
        for item in _listed(value):
            if glob.has_magic(str(item)):
                if not glob.glob(str(item), recursive=True):
                    raise ConfigError(key, f"the pattern {item} matches no file")
            elif not Path(item).exists():
                raise ConfigError(key, f"{item} does not exist")


def _listed(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
