"""The step loop the SPMD stages (sft, rm, dpo) share, so each stage file only says what one optimizer
step and one evaluation are.

Evaluation before training, every trainer.eval_every_steps and at the last step (generation-based
evaluation on its own schedule, being far dearer); metrics every trainer.log_every_steps; a checkpoint
every trainer.save_every_steps, at trainer.stop_after_steps, on a stop request (SIGUSR1 to the driver)
and at the end; what each rank holds after its first update (memory.json) and each rank's peak memory
(peak_memory.json); then final/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ftcluster.observe import comms, memory, peak
from ftcluster.train.engine import grad_norm
from ftcluster.stages.context import StageContext


@dataclass
class StepResult:
    """What one optimizer step did: its metrics, and the work it counted (summed over all ranks)."""

    metrics: dict
    tokens: float
    trainable_tokens: float
    examples: float
    extra: dict = field(default_factory=dict)


def run(ctx: StageContext, step_fn: Callable[[StageContext, int], StepResult],
        evaluate_fn: Callable[[StageContext, int, bool], None]) -> None:
    t = ctx.cfg.trainer
    if ctx.start_step == 0:
        evaluate_fn(ctx, 0, t.eval_generate)
    # from_pretrained returns a model in eval mode: without an evaluation to switch it back, dropout and
    # gradient checkpointing (transformers checks self.training) would silently stay off.
    ctx.engine.train()
    step = ctx.start_step
    while step < t.max_steps:
        started, comm_before = time.perf_counter(), comms.seconds_so_far()
        lr = ctx.engine.get_lr()[0]  # the rate this step uses; the schedule moves on inside step()
        result = step_fn(ctx, step)
        elapsed = time.perf_counter() - started
        timings = {"step_time_s": elapsed}
        if t.profile_comms:
            timings["comm_time_s"] = comms.seconds_so_far() - comm_before
        step += 1
        if step == ctx.start_step + 1:  # the optimizer's state exists from its first update on
            peak.note_baseline(ctx.engine)
            memory.record(ctx.engine, ctx.cfg.output_dir)
        ctx.tracker.advance()
        last = step == t.max_steps
        if step % t.log_every_steps == 0 or last:
            ctx.tracker.log(step, {
                **result.metrics, "lr": lr, "grad_norm": grad_norm(ctx.engine),
                "tokens_per_s": result.tokens / elapsed, "trainable_tokens_per_s": result.trainable_tokens / elapsed,
                "samples_per_s": result.examples / elapsed, "epoch": ctx.loader.epoch_of(step - 1), **timings,
            })
        generate = t.eval_generate and (last or every(step, t.eval_generate_every_steps))
        if every(step, t.eval_every_steps) or last or generate:
            evaluate_fn(ctx, step, generate)
        planned_stop = t.stop_after_steps is not None and step >= t.stop_after_steps
        requested_stop = ctx.end_of_step(step)
        if every(step, t.save_every_steps) or last or planned_stop or requested_stop:
            ctx.save_checkpoint(step)
        if (planned_stop or requested_stop) and not last:
            why = "trainer.stop_after_steps asks" if planned_stop else "a stop was requested (SIGUSR1)"
            ctx.tracker.message(f"stopped after step {step} as {why}; "
                                f"resume=auto continues from {ctx.cfg.output_dir}/checkpoints/step-{step}")
            return
    peak.record(ctx.cfg.output_dir, ctx.rank)  # of training: the export below gathers whole weights on rank 0
    ctx.export_final()


def every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0
