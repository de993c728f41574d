"""What follows a training step: metrics, evaluation, a checkpoint, the end of the run.

One set of rules for the SPMD loop (ftcluster.train.loop) and the RL controller (ftcluster.rl.context), so
the two cannot drift apart. Evaluation before training (a fresh start only), every trainer.eval_every_steps
and at the last step; generation-based evaluation (trainer.eval_generate, where the loop has one of its own)
before training, at the last step and every trainer.eval_generate_every_steps, decoding being far dearer;
metrics every trainer.log_every_steps and at the last step; a checkpoint every trainer.save_every_steps, at
the last step, and on an early stop: at trainer.stop_after_steps, or on request (SIGUSR1 or SIGTERM to the driver).

Whether a stop was requested is asked of a callable, once per step, after evaluation (a request made while
evaluating still stops at this step): SPMD ranks must agree on it, so theirs is a collective; the single
RL controller just looks for the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

REQUESTED = "a stop was requested (SIGUSR1 or SIGTERM)"
PLANNED = "trainer.stop_after_steps asks"


def every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


@dataclass(frozen=True)
class Due:
    """What follows step `step` (the count of steps done) up to the stop check."""

    step: int
    last: bool
    log: bool
    evaluate: bool
    generate: bool  # the evaluation includes generation


@dataclass(frozen=True)
class Ending:
    """The decision after the stop check: checkpoint now? stop the run now (before max_steps)?"""

    step: int
    save: bool
    stop: bool
    reason: str | None  # why it stops: PLANNED or REQUESTED

    def message(self, output_dir: str, say_why: bool = True) -> str:
        why = f" as {self.reason}" if say_why else ""
        return (f"stopped after step {self.step}{why}; "
                f"resume=auto continues from {output_dir}/checkpoints/step-{self.step}")


class StepSchedule:
    """`trainer`: the config's trainer section. `stop_requested(step)` is called exactly once per step, in
    ending(). `generation`: whether the caller evaluates with generation on a schedule of its own (the
    SPMD stages do; the RL evaluation always generates, on the evaluation schedule)."""

    def __init__(self, trainer, stop_requested: Callable[[int], bool], generation: bool = True):
        self.t, self.stop_requested = trainer, stop_requested
        self.generation = generation and bool(trainer.eval_generate)

    def before_training(self, start_step: int) -> Due:
        """Evaluation of the model as it starts: on a fresh start only (a resumed run did it before)."""
        fresh = start_step == 0
        return Due(0, False, False, fresh, fresh and self.generation)

    def due(self, step: int) -> Due:
        t = self.t
        last = step == t.max_steps
        generate = self.generation and (last or every(step, t.eval_generate_every_steps))
        return Due(step, last, step % t.log_every_steps == 0 or last,
                   every(step, t.eval_every_steps) or last or generate, generate)

    def ending(self, step: int) -> Ending:
        t = self.t
        planned = t.stop_after_steps is not None and step >= t.stop_after_steps
        requested = self.stop_requested(step)  # always asked: for SPMD ranks it is a collective
        last = step == t.max_steps
        early = (planned or requested) and not last
        return Ending(step, every(step, t.save_every_steps) or last or planned or requested, early,
                      (PLANNED if planned else REQUESTED) if early else None)
