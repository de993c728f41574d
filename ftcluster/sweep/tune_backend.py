"""sweep.backend=ray: Ray Tune chooses the trials (grid, seeded random, or Optuna TPE) and stops the weak ones
(ASHA, median stopping); every trial is `ftcluster.run.driver.train` on the trial's config, run in a thread of the
trial's Tune actor, so its workers are placed on the cluster exactly as `ftcluster train` does.

Tune learns a trial's progress from the run's own metrics.jsonl, read while the run goes: each row carrying
`sweep.metric` is one result, with the training step as Tune's time. A trial the scheduler stops is asked to
stop through ftcluster.train.stop (the workers checkpoint after the current step and return), so it ends cleanly and
could be continued. The trial actor reserves no CPU: the run's workers hold the trial's resources,
and sweep.concurrency bounds how many run at once (checked against the cluster before any trial starts).

Data: every set the trials train on is prepared once before the first trial starts (ftcluster.sweep.data), so
each trial's run reuses it and says so in its log.

Resume: Tune's experiment state lives in <sweep>/tune; Tuner.restore runs the unfinished and failed trials again
(each continues from its own newest checkpoint, resume=auto) and leaves finished ones alone.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import ray
from omegaconf import DictConfig, OmegaConf
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search import BasicVariantGenerator

from ftcluster.config import apply_schema
from ftcluster.errors import StoppedOnRequest
from ftcluster.launch.cluster import connect
from ftcluster.sweep.data import prepare_before_trials
from ftcluster.sweep.plan import Plan, check_concurrency
from ftcluster.sweep.trial import (TRIALS_DIR, TUNE_DIR, metric_rows, read_record, trial_config, wandb_group,
                                   write_record)
from ftcluster.train import stop

TRIAL_ACTOR_MEMORY = 2**20  # bytes of Ray's logical memory resource
POLL_S = 0.2


class TrialRun(tune.Trainable):
    """One trial: its run in a background thread, its metric rows reported one per step() call."""

    def setup(self, config: dict, base: dict, group: str) -> None:
        sweep = apply_schema(base)
        self.output_dir = Path(sweep.output_dir) / TRIALS_DIR / self.trial_id
        self.cfg = trial_config(sweep, config, self.output_dir, group)
        self.metric, self.mode = sweep.sweep.metric, sweep.sweep.mode
        self.reported_step = -1
        self.failure: BaseException | None = None
        self.stopped_at: Path | None = None
        write_record(self.output_dir, trial=self.trial_id, params=config, status="running")
        self.thread = threading.Thread(target=self._train, name=f"ftcluster-{self.trial_id}", daemon=True)
        self.thread.start()

    def _train(self) -> None:
        # not at the top: only trial actors train (the sweep's process prepares data, and loads no model)
        from ftcluster.run.driver import train

        try:
            train(self.cfg, ["sweep", f"trial={self.trial_id}"])
        except StoppedOnRequest as stopped:
            self.stopped_at = stopped.checkpoint
        except BaseException as exc:  # handed to Tune by step(): the trial is marked failed with it
            self.failure = exc

    def step(self) -> dict:
        while True:
            alive = self.thread.is_alive()  # before reading: a row logged before the run ended is never missed
            fresh = [r for r in metric_rows(self.output_dir, self.metric) if r["step"] > self.reported_step]
            if fresh:
                row = fresh[0]
                self.reported_step = row["step"]
                if row["step"] >= self.cfg.trainer.max_steps:  # the last evaluation: done once final/ is written
                    self.thread.join()
                    self._raise_failure()
                    return {**self._result(row), "done": True}
                return self._result(row)
            if not alive:
                self._raise_failure()
                rows = metric_rows(self.output_dir, self.metric)
                if not rows:
                    raise RuntimeError(f"the run in {self.output_dir} ended without logging {self.metric}")
                return {**self._result(rows[-1]), "done": True}  # e.g. trainer.stop_after_steps
            time.sleep(POLL_S)

    def _result(self, row: dict) -> dict:
        value = float(row[self.metric])
        if not math.isfinite(value):  # a diverged trial (NaN loss) is the worst, not one the scheduler skips
            value = math.inf if self.mode == "min" else -math.inf
        return {"step": row["step"], self.metric: value}

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def cleanup(self) -> None:
        """Called when the trial ends, including when the scheduler stops it: ask the run to checkpoint and stop,
        and wait for it, so that the next trial gets its resources and this one's folder is whole."""
        request = stop.request_file(self.output_dir)
        while self.thread.is_alive():
            request.touch()  # the driver clears a request left by an earlier attempt as it starts: ask until seen
            self.thread.join(timeout=1.0)
        request.unlink(missing_ok=True)
        if self.stopped_at is not None:
            write_record(self.output_dir, status="stopped", step=int(self.stopped_at.name.split("-")[-1]))
        elif self.failure is not None:
            write_record(self.output_dir, status="failed", error=_first_line(self.failure))
        else:
            write_record(self.output_dir, status="completed", step=self.cfg.trainer.max_steps)

    def reset_config(self, new_config: dict) -> bool:
        """The next trial in this actor (reuse_actors): the libraries the driver imports are loaded already."""
        self.cleanup()
        self.setup(new_config)  # (tune.with_parameters adds base and group again)
        return True

    # The run keeps its own checkpoints in its folder and resumes from them (resume=auto): Tune has nothing to keep.
    def save_checkpoint(self, checkpoint_dir: str) -> dict:
        return {"step": self.reported_step}

    def load_checkpoint(self, checkpoint: dict) -> None:
        pass


class StopWhenDecided(tune.Callback):
    """Asks a trial's run to stop the moment the scheduler decides, from the driver: the trial's actor may be kept
    for the next trial (reuse_actors) and hear of it only then."""

    def __init__(self, trials_dir: Path):
        self.trials_dir = trials_dir

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if not (trial.last_result or {}).get("done"):  # a run that finished needs no request
            stop.request_file(self.trials_dir / trial.trial_id).touch()


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def run(plan: Plan, resume: bool) -> None:
    cfg = plan.cfg
    connect(cfg.launcher.address if cfg.launcher.name == "ray" else None, dashboard=cfg.launcher.dashboard)
    if cfg.launcher.name == "ray":  # a joined cluster: its own resources, now that we can see them
        total = ray.cluster_resources()
        check_concurrency(cfg, total.get("CPU", 0), total.get("GPU", 0))
    # Every set the trials will train on, prepared once now, on the cluster's cores, while no trial holds them.
    prepare_before_trials(plan)
    # Trials resolve paths from where the sweep was started (Tune would run each in its own folder).
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    # No CPU for the trial actor, whose run's workers hold the trial's resources; Tune wants some resource in
    # every trial's placement group, so a token of memory.
    trainable = tune.with_resources(
        tune.with_parameters(TrialRun, base=OmegaConf.to_container(cfg), group=wandb_group(cfg)),
        {"cpu": 0, "memory": TRIAL_ACTOR_MEMORY})
    path = Path(cfg.output_dir) / TUNE_DIR
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        callbacks = [StopWhenDecided(Path(cfg.output_dir) / TRIALS_DIR)]
        tuner = tune.Tuner(trainable, param_space={p.key: p.tune_domain(cfg.sweep.search) for p in plan.space},
                           tune_config=_tune_config(cfg, plan.trials),
                           run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(Path(cfg.output_dir)), verbose=1,
                                                     callbacks=callbacks))
    for result in tuner.fit():
        # A trial whose actor died (out of memory, a lost node) never got to record its end.
        folder = Path(cfg.output_dir) / TRIALS_DIR / Path(result.path).name
        if result.error is not None and read_record(folder).get("status") not in ("failed", "completed", "stopped"):
            write_record(folder, status="failed", error=_first_line(result.error))


def _tune_config(cfg: DictConfig, trials: int) -> tune.TuneConfig:
    s = cfg.sweep
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # not at the top: it imports optuna, for search=optuna only

        search, limit = OptunaSearch(seed=cfg.seed), s.concurrency  # (Tune wraps it in a ConcurrencyLimiter)
    else:
        search, limit = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=s.concurrency), None
    return tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search, scheduler=_scheduler(cfg),
                           num_samples=1 if s.search == "grid" else trials, max_concurrent_trials=limit,
                           trial_dirname_creator=lambda trial: trial.trial_id, reuse_actors=True)


def _scheduler(cfg: DictConfig):
    s = cfg.sweep
    if s.scheduler == "asha":
        return ASHAScheduler(time_attr="step", max_t=cfg.trainer.max_steps, grace_period=s.grace_steps,
                             reduction_factor=s.reduction_factor)
    if s.scheduler == "median":
        return MedianStoppingRule(time_attr="step", grace_period=s.grace_steps)
    return FIFOScheduler()
