"""Where metrics go: metrics.jsonl (always), the console and a progress bar, wandb, TensorBoard.

Only rank 0 tracks; other ranks get a tracker that drops everything, so stage code never asks
which rank it is on before logging.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ftcluster.util import atomic
from ftcluster.util.secrets import redact

METRICS_FILE = "metrics.jsonl"
# The RL stages' sampled prompts, completions and rewards, one row per sample of each logged step.
ROLLOUTS_FILE = "rollouts.jsonl"


def truncate_metrics(output_dir: str | Path, after_step: int, name: str = METRICS_FILE) -> None:
    """On resume: drop rows past the checkpoint, which the resumed run writes again, and a last row cut short
    by the crash (appended to, it would corrupt the next row too; one that an older version let through, in
    the middle, goes too)."""
    path = Path(output_dir) / name
    if not path.is_file():
        return
    rows = _rows(path.read_text(encoding="utf-8"), torn_anywhere=True)
    kept = [line for line, row in rows if row["step"] <= after_step]
    atomic.write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(output_dir: str | Path, name: str = METRICS_FILE) -> list[dict]:
    path = Path(output_dir) / name
    return [row for _, row in _rows(path.read_text(encoding="utf-8"))] if path.is_file() else []


def _rows(text: str, torn_anywhere: bool = False) -> list[tuple[str, dict]]:
    """JSON Lines: split on "\n" only. (str.splitlines also splits on U+2028, U+0085 and other separators
    that json.dumps(ensure_ascii=False) leaves as they are in model output.) A last line that does not parse
    is a write cut short (a crash, or a row being written now) and is left out."""
    lines = [line for line in text.split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and not torn_anywhere:
                raise
    return rows


class Tracker:
    def __init__(self, cfg: DictConfig, start_step: int, total_steps: int):
        self.output_dir = Path(cfg.output_dir)
        self._file = open(self.output_dir / METRICS_FILE, "a", encoding="utf-8")
        self._bar = _progress_bar(start_step, total_steps) if cfg.tracking.progress else None
        self._wandb = _start_wandb(cfg) if cfg.tracking.wandb.enabled else None
        self._tb = _start_tensorboard(self.output_dir) if cfg.tracking.tensorboard else None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        self._print(step, metrics)

    def log_rows(self, name: str, rows: list[dict]) -> None:
        """Append rows (each with its step) to output_dir/<name>, e.g. the RL stages' rollouts."""
        with open(self.output_dir / name, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False) + "\n" for row in rows)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def message(self, text: str) -> None:
        print(f"[ftcluster] {text}", flush=True)

    def _print(self, step: int, metrics: dict) -> None:
        shown = " ".join(f"{k}={_short(v)}" for k, v in metrics.items())
        print(f"[ftcluster] step {step}: {shown}", flush=True)

    def close(self) -> None:
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


class NullTracker:
    def log(self, step: int, metrics: dict) -> None: ...
    def log_rows(self, name: str, rows: list[dict]) -> None: ...
    def advance(self) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def make_tracker(cfg: DictConfig, rank: int, start_step: int, total_steps: int):
    return Tracker(cfg, start_step, total_steps) if rank == 0 else NullTracker()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible rather than crash or drop it
    return value


def _short(value) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _progress_bar(start: int, total: int):
    # Inside a Ray worker, tqdm_ray draws the bar in the driver's terminal instead of interleaving
    # carriage returns with other workers' log lines.
    progress = tqdm
    if os.environ.get("FTCLUSTER_IN_RAY") == "1":
        # not at the top: the driver imports this module, and launcher=processes runs without Ray
        from ray.experimental.tqdm_ray import tqdm as progress
    bar = progress(total=total, desc="train", unit="step")
    bar.update(start)  # a resumed run starts part-way
    return bar


def _start_wandb(cfg: DictConfig):
    import wandb  # not at the top: optional, for tracking.wandb only

    w = cfg.tracking.wandb
    id_file = Path(cfg.output_dir) / "wandb_run_id"
    # Kept in output_dir so that a resumed run continues the same wandb run.
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=w.project, group=w.group, name=w.name or Path(cfg.output_dir).name, id=run_id,
                      resume="allow", mode=w.mode, dir=str(cfg.output_dir),
                      config=redact(OmegaConf.to_container(cfg, resolve=True)))


def _start_tensorboard(output_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # not at the top: needs the optional tensorboard package

    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))
