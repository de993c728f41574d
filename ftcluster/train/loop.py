"""What surrounds each optimizer step of the SPMD stages (sft, rm, dpo): each stage writes its own loop
over `steps()` and takes the step itself, so the path from the stage to the optimizer reads top to bottom.

Metrics, evaluation, checkpoints and stopping on ftcluster.train.schedule's rules (which the RL controller
follows too), the stop check being a collective with the watchdog's heartbeat (StageContext.end_of_step);
what each rank holds after its first update (memory.json) and each rank's peak memory (peak_memory.json);
then final/.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ftcluster.observe import comm_time, held_memory, peak_memory
from ftcluster.errors import UserError
from ftcluster.train.engine import grad_norm
from ftcluster.train.context import StageContext
from ftcluster.train.schedule import StepSchedule


@dataclass
class StepResult:
    """What one optimizer step did: its metrics, and the work it counted (summed over all ranks)."""

    metrics: dict
    tokens: float
    trainable_tokens: float
    examples: float


@dataclass
class Step:
    """One optimizer step of the loop: its index (the count of steps done before it); the stage's body
    sets `result` once the step is taken."""

    index: int
    result: StepResult | None = None


def steps(ctx: StageContext, evaluate_fn: Callable[[StageContext, int, bool], None]) -> Iterator[Step]:
    """The steps a stage takes, from ctx.start_step to trainer.max_steps; the stage's own loop body takes
    each one and sets step.result:

        for step in loop.steps(ctx, evaluate):
            step.result = take_the_step(ctx, step.index)

    Around each step this logs the metrics, evaluates, checkpoints and stops early on the schedule's rules;
    after the last one it records peak memory and writes final/."""
    t = ctx.cfg.trainer
    schedule = StepSchedule(t, ctx.end_of_step)
    start = schedule.before_training(ctx.start_step)
    if start.evaluate:
        evaluate_fn(ctx, 0, start.generate)
    # from_pretrained returns a model in eval mode: without an evaluation to switch it back, dropout and
    # gradient checkpointing (transformers checks self.training) would silently stay off.
    ctx.engine.train()
    for index in range(ctx.start_step, t.max_steps):
        started, comm_before = time.perf_counter(), comm_time.seconds_so_far()
        lr = ctx.engine.get_lr()[0]  # the rate this step uses; the schedule moves on inside the step
        step = Step(index)
        yield step
        if step.result is None:
            raise RuntimeError(f"the stage's loop body took no step {index} (it must set step.result)")
        result, elapsed, done = step.result, time.perf_counter() - started, index + 1
        norm = grad_norm(ctx.engine)
        _check_finite(ctx, done, result.metrics.get("loss"), norm)
        timings = {"step_time_s": elapsed}
        if t.profile_comms:
            timings["comm_time_s"] = comm_time.seconds_so_far() - comm_before
        if done == ctx.start_step + 1:  # the optimizer's state exists from its first update on
            peak_memory.note_baseline(ctx.engine)
            held_memory.record(ctx.engine, ctx.cfg.output_dir)
        ctx.tracker.advance()
        due = schedule.due(done)
        if due.log:
            ctx.tracker.log(done, {
                **result.metrics, "lr": lr, "grad_norm": norm,
                "tokens_per_s": result.tokens / elapsed, "trainable_tokens_per_s": result.trainable_tokens / elapsed,
                "samples_per_s": result.examples / elapsed, "epoch": ctx.loader.epoch_of(index), **timings,
            })
        if due.evaluate:
            evaluate_fn(ctx, done, due.generate)
        ending = schedule.ending(done)
        if ending.save:
            ctx.save_checkpoint(done)
        if ending.stop:
            ctx.tracker.message(ending.message(ctx.cfg.output_dir))
            return
    peak_memory.record(ctx.cfg.output_dir, ctx.rank)  # of training: the export below gathers whole weights on rank 0
    ctx.export_final()


def _check_finite(ctx: StageContext, done: int, loss: float | None, norm: float) -> None:
    """trainer.on_nonfinite=stop: a NaN or infinite loss or gradient norm ends the run here, before the schedule
    may save this step's weights, so the newest checkpoint stays the last good one. Both values are all-reduced
    already, so every rank decides alike and none is left waiting in a collective. Under fp16 the gradient norm
    is not checked: DeepSpeed's loss scaler skips an overflowing update itself and lowers the scale."""
    values = {"loss": loss}
    if ctx.cfg.strategy.precision != "fp16":
        values["grad_norm"] = norm
    bad = ", ".join(f"{name}={value}" for name, value in values.items()
                    if value is not None and not math.isfinite(value))
    if bad:
        raise UserError(f"step {done}: non-finite {bad}; the run stopped without saving this step "
                        f"(trainer.on_nonfinite=stop). Lower optim.lr or strengthen strategy.gradient_clipping, "
                        f"check the data, and continue from the newest checkpoint with resume=auto")
