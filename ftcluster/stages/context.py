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
    launch_id: str  # recorded in checkpoints: a restarted worker resumes from those of its own launch
    watchdog: Any  # ftcluster.watchdog.Watchdog

    def end_of_step(self, step: int) -> bool:
        """Collective, once per optimizer step: heartbeat, and whether to checkpoint and stop now."""
        from ftcluster import stop

        self.watchdog.beat(step)
        return stop.requested(self.cfg.output_dir)
