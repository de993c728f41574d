"""What a stage is handed: everything built and placed, nothing left to decide about processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig


@dataclass
class StageContext:
    cfg: DictConfig
    engine: Any  # deepspeed.DeepSpeedEngine; owns model, optimizer and schedule
    tokenizer: Any
    pad_id: int  # the id padding uses in batches (never attended to, never trained)
    loader: Any  # ftcluster.data.loader.GlobalBatchLoader
    eval_rows: Any  # datasets.Dataset of eval rows, or None
    eval_prompts: list  # [{"prompt": messages, "reference": text}] for generation-based eval
    tracker: Any
    model_dir: str
    start_step: int
    rank: int
    world_size: int
