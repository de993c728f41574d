"""What both backends do for one trial: its config (the sweep's, with the trial's values, its own output_dir
under <sweep>/trials/, resume=auto so that an interrupted trial continues from its newest checkpoint, the sweep's
wandb group), and its record trial.json, which the summary reads beside the run's own files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftcluster.util.atomic import write_text
from ftcluster.observe.track import METRICS_FILE

TRIALS_DIR = "trials"
TUNE_DIR = "tune"  # where the Ray Tune backend keeps its experiment, beside TRIALS_DIR
RECORD_FILE = "trial.json"


def plain(value):
    """Ray and numpy hand over numpy scalars; the config and JSON want Python values."""
    return value.item() if hasattr(value, "item") else value


def trial_config(base: DictConfig, values: dict, output_dir: Path, group: str) -> DictConfig:
    cfg = copy.deepcopy(base)
    for key, value in values.items():
        OmegaConf.update(cfg, key, plain(value), merge=False)
    cfg.output_dir = str(output_dir)
    cfg.resume = "auto"
    cfg.tracking.wandb.group = group
    cfg.tracking.wandb.name = output_dir.name
    return cfg


def wandb_group(cfg: DictConfig) -> str:
    """The user's tracking.wandb.group, else the sweep folder's name: one wandb group per sweep."""
    return cfg.tracking.wandb.group or Path(cfg.output_dir).name


def write_record(output_dir: Path, **record) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RECORD_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    write_text(path, json.dumps({**old, **{k: plain(v) for k, v in record.items()}}, indent=2))


def read_record(output_dir: Path) -> dict:
    path = output_dir / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def metric_rows(output_dir: Path, metric: str) -> list[dict]:
    """The rows of metrics.jsonl that carry the metric, one per step (a resumed run logs a step again: the
    newest row wins). A line still being written is left for the next read."""
    rows = {}
    path = output_dir / METRICS_FILE
    for line in path.read_text(encoding="utf-8").split("\n") if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if metric in row:
            rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]
