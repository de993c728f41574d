"""What a stage is handed: everything built and placed, nothing left to decide about processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftcluster.config.schema import TrainConfig
from ftcluster.data.loader import GlobalBatchLoader
from ftcluster.data.rows import PreparedRows
from ftcluster.observe.track import NullTracker, Tracker
from ftcluster.observe.watchdog import Watchdog
from ftcluster.train import checkpoint_io, stop
from ftcluster.train.engine import full_state_dict
from ftcluster.train.export import write_final
from ftcluster.util import dist

if TYPE_CHECKING:  # for the annotations only: both take seconds to import
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase


@dataclass
class StageContext:
    # A DictConfig merged onto the schema (ftcluster.config.apply_schema): typed reads, and a wrong type
    # assigned fails; annotated with the schema's class so that editors and type checkers see its fields.
    cfg: TrainConfig
    engine: DeepSpeedEngine  # owns model, optimizer and schedule
    tokenizer: PreTrainedTokenizerBase
    pad_id: int  # the id padding uses in batches (never attended to, never trained)
    loader: GlobalBatchLoader
    eval_rows: PreparedRows | None
    eval_prompts: list[dict]  # [{"prompt": messages, "reference": text}] for generation-based eval
    tracker: Tracker | NullTracker
    model_dir: str
    start_step: int
    rank: int
    world_size: int
    launch_id: str  # recorded in checkpoints: a restarted worker resumes from those of its own launch
    watchdog: Watchdog
    ds_config: dict  # the DeepSpeed config the engine was built with (a frozen copy is sharded alike)
    model_kind: str  # ftcluster.stages.registry: what the engine's model is ("causal_lm" or "reward")

    def end_of_step(self, step: int) -> bool:
        """Collective, once per optimizer step: heartbeat, and whether to checkpoint and stop now."""
        self.watchdog.beat(step)
        return stop.requested(self.cfg.output_dir)

    def save_checkpoint(self, step: int) -> None:
        """Collective: model, optimizer, schedule, RNG and data position, atomically."""
        state = {"data": self.loader.state_dict(step), "model_dir": self.model_dir, "world_size": self.world_size,
                 "launch_id": self.launch_id, "model_kind": self.model_kind}
        path = checkpoint_io.save(self.engine, self.cfg.output_dir, step, state, self.cfg.trainer.keep_last_checkpoints,
                               exclude_frozen=self.cfg.peft.method != "none")
        self.tracker.message(f"saved {path}")

    def export_final(self) -> None:
        """Collective: final/ (consolidated safetensors + tokenizer; merged weights and final/adapter/ with PEFT)."""
        state_dict = full_state_dict(self.engine)
        if self.rank == 0:
            out = write_final(state_dict, self.cfg, self.model_dir, f"{self.cfg.output_dir}/final", self.tokenizer,
                              kind=self.model_kind)
            self.tracker.message(f"exported {out}")
        dist.barrier()
