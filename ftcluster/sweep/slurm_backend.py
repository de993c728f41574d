"""sweep.backend=slurm: every point at once as one SLURM array job, through Hydra's multirun machinery with the
submitit SLURM launcher (hydra-submitit-launcher): one array task per point, each composing the sweep's
overrides plus its own (Hydra's job config), then running `ftcluster.run.driver.train` with launcher=local on its node,
in <sweep>/trials/point_NNN (Hydra's .hydra/ beside the run's files).

The points are all chosen before submission (a grid, or seeded random draws), so no early stopping here. Array
task resources come from launcher.*: cpus_per_task (default workers x cpus_per_worker), gpus_per_node,
partition, time, account, qos, constraint and setup lines; sweep.concurrency caps the tasks running at once
(the array's %N). A point whose folder holds a finished run is not submitted again (resume=auto).

submitit learns that a task ended from its result file, or from `sacct`, which clusters without accounting
lack: a task killed from outside (scancel, a node lost) would leave it waiting forever. So squeue is watched
too, and a job that has left the queue without results fails the sweep with the points and their logs.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from hydra import initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig

from ftcluster.config import apply_schema, conf_dir
from ftcluster.errors import ConfigError, WorkerFailed
from ftcluster.launch.sbatch import check_against_cluster
from ftcluster.launch.submit import hydra_quote
from ftcluster.sweep.plan import Plan
from ftcluster.sweep.space import grid_points, random_points
from ftcluster.sweep.summary import status
from ftcluster.sweep.trial import TRIALS_DIR, read_record, wandb_group, write_record
from ftcluster.util.text import tail

POLL_S = 2.0
# After the array has left the queue, how long submitit may take to collect results before we call them lost.
LOST_AFTER_S = 60.0


def run(plan: Plan, overrides: list[str], resume: bool) -> None:
    cfg = plan.cfg
    check_against_cluster(cfg.launcher)
    sweep_dir = Path(cfg.output_dir)
    points = grid_points(plan.space) if cfg.sweep.search == "grid" else \
        random_points(plan.space, plan.trials, cfg.seed)
    jobs = []
    for index, point in enumerate(points):
        name = f"point_{index:03d}"
        out = sweep_dir / TRIALS_DIR / name
        if resume and status(out, read_record(out), cfg.trainer.max_steps) == "completed":
            continue
        write_record(out, trial=name, params=point, status="submitted")
        # A job composes the launcher's hydra.* overrides and its own only: the sweep's go in every job.
        jobs.append([*overrides, *point_overrides(point, name, out, wandb_group(cfg), cfg.data.prepared_dir)])
    if not jobs:
        print(f"[ftcluster] every point of the sweep in {sweep_dir} has finished; nothing to submit", flush=True)
        return
    launch_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    job_name = f"{cfg.launcher.job_name}-sweep-{launch_id}"
    # A fresh folder per launch: job ids restart with the cluster, and submitit would read another launch's
    # results from a reused one.
    folder = sweep_dir / "slurm" / launch_id
    print(f"[ftcluster] submitting {len(jobs)} points as SLURM array job {job_name}; logs in {folder}", flush=True)
    if not _has_accounting():
        # not at the top: submitit is for SLURM sweeps only (and its import configures the logger set here)
        from submitit.core import logger as submitit_logger

        submitit_logger.get_logger().setLevel(logging.ERROR)  # its every status poll would warn
        print("[ftcluster] this cluster has no accounting (sacct); each 'Slurm accounting storage is disabled' below "
              "is one of submitit's status polls, and squeue is watched instead", flush=True)
    with hydra_launcher(cfg, overrides, sweep_dir, job_name, folder) as launcher:
        watched(lambda: launcher.launch(jobs, initial_job_idx=0), job_name, folder)


def point_overrides(point: dict, name: str, out: Path, group: str, store: str | None = None) -> list[str]:
    """`store`: the data store every point shares (trial.trial_store): the first task to need a set prepares it
    inside the allocation, and tasks needing the same set wait for it and reuse it."""
    return [*(f"{key}={hydra_value(value)}" for key, value in point.items()),
            f"output_dir={hydra_quote(str(out))}", "resume=auto", "launcher.name=local",
            f"tracking.wandb.group={hydra_quote(group)}", f"tracking.wandb.name={name}",
            *([f"data.prepared_dir={hydra_quote(store)}"] if store else []),
            f"hydra.sweep.subdir={TRIALS_DIR}/{name}"]


def hydra_value(value) -> str:
    """A Python value as a Hydra override reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return hydra_quote(str(value))


@contextmanager
def hydra_launcher(cfg: DictConfig, overrides: list[str], sweep_dir: Path, job_name: str, folder: Path):
    """The submitit SLURM launcher, set up as `--multirun hydra/launcher=submitit_slurm` would set it up."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        config = hydra.compose_config("train", [*overrides, *launcher_overrides(cfg, sweep_dir, job_name, folder)],
                                      run_mode=RunMode.MULTIRUN)
        context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(config))
        yield Plugins.instance().instantiate_launcher(hydra_context=context, task_function=run_point, config=config)


def launcher_overrides(cfg: DictConfig, sweep_dir: Path, job_name: str, folder: Path) -> list[str]:
    launcher = cfg.launcher
    cpus = launcher.cpus_per_task or launcher.workers * launcher.cpus_per_worker
    settings = {"submitit_folder": str(folder), "name": job_name, "nodes": 1, "tasks_per_node": 1,
                "cpus_per_task": cpus, "gpus_per_node": launcher.gpus_per_node or None,
                "partition": launcher.partition, "account": launcher.account, "qos": launcher.qos,
                "constraint": launcher.constraint, "array_parallelism": cfg.sweep.concurrency,
                "timeout_min": minutes(launcher.time) if launcher.time else None,
                "setup": list(launcher.setup) or None}
    return ["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={hydra_quote(str(sweep_dir))}",
            *(f"hydra.launcher.{k}={hydra_value(v)}" for k, v in settings.items() if v is not None)]


def minutes(limit: str) -> int:
    """A SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes: submitit's unit."""
    days, _, clock = limit.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        if days:
            hours, mins, secs = (parts + [0, 0])[:3]
        elif len(parts) == 3:
            hours, mins, secs = parts
        else:
            hours, (mins, secs) = 0, (parts + [0])[:2]
        return math.ceil(int(days or 0) * 1440 + hours * 60 + mins + secs / 60)
    except ValueError:
        raise ConfigError("launcher.time", f"{limit!r} is not a SLURM time limit (MM, HH:MM:SS or D-HH:MM:SS)") from None


def run_point(task_cfg: DictConfig) -> str:
    """Inside the array task: Hydra has composed this point's config; train it as `ftcluster train` would."""
    # not at the top: only the array task trains; the process that submits it does without torch and transformers
    from ftcluster.run.driver import train

    cfg = apply_schema(task_cfg)
    out = Path(cfg.output_dir)
    write_record(out, status="running")
    try:
        final = train(cfg, ["sweep", f"point={out.name}"])
    except BaseException as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        write_record(out, status="failed", error=f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500])
        raise
    write_record(out, status="completed", step=cfg.trainer.max_steps)
    return str(final)


def watched(launch, job_name: str, folder: Path) -> None:
    """launch() in a thread, with squeue watched beside it (see the module docstring)."""
    outcome: dict = {}

    def target():
        try:
            outcome["returns"] = launch()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="ftcluster-sweep-launch", daemon=True)
    thread.start()
    submitted, gone_since = False, None
    while thread.is_alive():
        thread.join(POLL_S)
        queued = _queued(job_name)
        if queued is None:
            continue
        # A task that fails at once may leave the queue between two polls: submitted counts as seen.
        submitted = submitted or queued or any(folder.glob("*_submitted.pkl"))
        if queued:
            gone_since = None
        elif submitted:
            gone_since = gone_since or time.time()
            if time.time() - gone_since > LOST_AFTER_S:
                raise WorkerFailed(f"SLURM array job {job_name} left the queue but some of its tasks never wrote a "
                                   f"result (cancelled, out of time or on a lost node?); their logs are in {folder}"
                                   f"{_log_tail(folder)}")
    if "error" in outcome:
        raise outcome["error"]


def _log_tail(folder: Path, lines: int = 5) -> str:
    """The end of the first task log that has an error in it, to put in the failure message."""
    for log in sorted(folder.glob("*_log.err")):
        text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if text:
            return f"; the end of {log.name}:\n" + tail("\n".join(text), lines)
    return ""


def _has_accounting() -> bool:
    return shutil.which("sacct") is not None and subprocess.run(["sacct", "-n", "-X", "-j", "1"],
                                                                 capture_output=True).returncode == 0


def _queued(job_name: str) -> bool | None:
    result = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i"], capture_output=True, text=True)
    if result.returncode != 0:
        return None  # the controller may be busy: ask again next time
    return bool(re.search(r"\S", result.stdout))
