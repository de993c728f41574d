"""What surrounds each optimizer step of the SPMD stages (sft, rm, dpo): each stage writes its own loop
over `steps()` and takes the step itself, so the path from the stage to the optimizer reads top to bottom.

Metrics, evaluation, checkpoints and stopping on ftcluster.train.schedule's rules (which the RL controller
follows too), the stop check being a collective with the watchdog's heartbeat (StageContext.end_of_step);
what each rank holds after its first update (memory.json) and each rank's peak memory (peak_memory.json);
then final/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ftcluster.observe import comm_time, held_memory, peak_memory
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
                **result.metrics, "lr": lr, "grad_norm": grad_norm(ctx.engine),
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
