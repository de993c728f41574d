"""What both backends do for one trial: its config (the sweep's, with the trial's values, its own output_dir
under <sweep>/trials/, resume=auto so that an interrupted trial continues from its newest checkpoint, the sweep's
wandb group, one data store for all trials), and its record trial.json, which the summary reads beside the run's
own files."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftcluster.util.atomic import write_text
from ftcluster.observe.track import METRICS_FILE

TRIALS_DIR = "trials"
TUNE_DIR = "tune"  # where the Ray Tune backend keeps its experiment, beside TRIALS_DIR
RECORD_FILE = "trial.json"

# <sweep>/prepared: the trials' store when they may run on other nodes than the sweep's (trial_store).
STORE_DIR = "prepared"


def trial_store(cfg: DictConfig) -> str | None:
    """data.prepared_dir for every trial: the user's; else FTCLUSTER_CACHE's store, named explicitly (a trial's
    process on another node may not have the variable); else, when trials may run on other nodes (launcher=ray,
    sweep.backend=slurm), <sweep>/prepared, which they all read (each run's own default there would be a folder
    of its own, and every trial would prepare again); else None, the default store on this machine."""
    if cfg.data.prepared_dir or os.environ.get("FTCLUSTER_CACHE"):
        from ftcluster.data import store  # not at the top: the sweep's checks do without the data layer

        return str(store.root(cfg.data.prepared_dir))  # absolute: a trial may start in another folder
    if cfg.launcher.name == "ray" or cfg.sweep.backend == "slurm":
        return str(Path(cfg.output_dir) / STORE_DIR)
    return None


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
