"""The RL stages' controller: the entry a launcher runs in the launching process for stages whose runner
is "rl" (PPO, GRPO). It places one actor group per role through the placement it is handed and runs the
stage's `train(ctx)` on an RLContext (ftcluster.rl.context)."""

from __future__ import annotations

from ftcluster.config import apply_schema
from ftcluster.rl.context import RLContext, RolePlacement
from ftcluster.stages.registry import STAGES


def run_controller(payload: dict, placement: RolePlacement) -> None:
    cfg = apply_schema(payload["config"])
    ctx = RLContext.start(cfg, payload, placement)
    try:
        STAGES[cfg.stage.name].entry()(ctx)
    finally:
        ctx.tracker.close()
