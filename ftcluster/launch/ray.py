"""launcher=local and launcher=ray: a Ray cluster started in this process (local) or the running one at
launcher.address (ray), and the workers placed there: one worker per GPU (or per cpus_per_worker CPUs), a torch
process group among them (NCCL on GPU, gloo on CPU), and the worker entry run in each. On launcher=local's one
node the workers are plain Ray actors (launch/ray_workers.py: seconds sooner to the first step); across nodes
(ray, slurm) Ray Train's TorchTrainer places them. A controller entry (RL) runs in this process with a
Placement for its actor groups instead.

Nothing here knows about stages or models: it gets a callable and a plain-data payload.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import ray
from omegaconf import DictConfig
from ray.exceptions import ActorDiedError, ActorUnavailableError, WorkerCrashedError

from ftcluster.errors import CollectiveTimeout, UserError, WorkerFailed
from ftcluster.launch import ray_workers
from ftcluster.launch.actors import Placement
from ftcluster.launch.cluster import connect
from ftcluster.launch.worker_env import worker_env
from ftcluster.observe.watchdog import HANG_REPORT, describe_rank, nccl_timeout_s, read_placement
from ftcluster.util.text import tail


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    connect(_address(cfg))
    run_workers(entry, payload, cfg)


def control(entry: Callable[[dict, Placement], None], payload: dict, cfg: DictConfig) -> None:
    connect(_address(cfg))
    run_controller(entry, payload, cfg)


def _address(cfg: DictConfig) -> str | None:
    """None starts a cluster in this process (launcher=local, whatever launcher.address says)."""
    return cfg.launcher.address if cfg.launcher.name == "ray" else None


def run_controller(entry: Callable[[dict, Placement], None], payload: dict, cfg: DictConfig) -> None:
    """entry(payload, placement) in this process; every actor group it placed is removed afterwards."""
    placement = Placement(cfg)
    try:
        entry(payload, placement)
    finally:
        placement.shutdown()


def run_workers(entry: Callable[[dict], None], payload: dict, cfg: DictConfig,
                label_selector: list[dict] | None = None) -> None:
    """Run `entry(payload)` on launcher.workers workers; raise when any of them failed, after
    launcher.max_failures restarts of the whole group. label_selector: one node-label selector per rank, to pin
    ranks to nodes (launcher=slurm)."""
    launcher = cfg.launcher
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = launcher.use_gpu if launcher.use_gpu is not None else gpus > 0
    _check_capacity(launcher, use_gpu)
    resources = {"CPU": launcher.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    backend = "nccl" if use_gpu else "gloo"
    # gloo raises in Python at the timeout and the worker names the hang itself; NCCL waits longer (worker_env).
    timeout_s = nccl_timeout_s(launcher.collective_timeout_s) if backend == "nccl" else launcher.collective_timeout_s
    started = time.time()
    if launcher.name == "local":
        env = {**worker_env(cfg, backend), "OMP_NUM_THREADS": str(launcher.cpus_per_worker)}
        ray_workers.run(entry, payload, workers=launcher.workers, resources=resources,
                        strategy=launcher.placement_strategy, env=env, backend=backend, timeout_s=timeout_s,
                        ready_timeout_s=launcher.ready_timeout_s, max_failures=launcher.max_failures,
                        on_failure=lambda failed: _worker_error(failed, cfg.output_dir, since=failed.since))
        return
    # not at the top: Ray Train's imports take seconds, which a controller (run_controller) and launcher=local
    # do without
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        entry,
        train_loop_config=payload,
        torch_config=TorchConfig(backend=backend, timeout_s=timeout_s),
        scaling_config=ScalingConfig(num_workers=launcher.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=launcher.placement_strategy, label_selector=label_selector),
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(Path(cfg.output_dir, "ray").resolve()),
                             failure_config=FailureConfig(max_failures=launcher.max_failures),
                             worker_runtime_env={"env_vars": worker_env(cfg, backend)}),
    )
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise _worker_error(exc, cfg.output_dir, since=started) from None


def _check_capacity(launcher: DictConfig, use_gpu: bool) -> None:
    total = ray.cluster_resources()
    need = {"CPU": launcher.workers * launcher.cpus_per_worker, **({"GPU": launcher.workers} if use_gpu else {})}
    for resource, amount in need.items():
        if total.get(resource, 0) < amount:
            raise UserError(f"launcher.workers={launcher.workers} needs {amount:g} {resource} but the Ray cluster has "
                            f"{total.get(resource, 0):g}; lower launcher.workers or add nodes")


def hang_reports(output_dir: str, since: float) -> list[str]:
    """The stall diagnoses workers wrote during this launch (observe/watchdog.py), in rank order."""
    found = sorted(Path(output_dir).glob(HANG_REPORT.format("*")), key=lambda p: int(p.stem.rsplit("-", 1)[-1]))
    return [p.read_text().strip() for p in found if p.stat().st_mtime >= since]


def _worker_error(exc: Exception, output_dir: str, since: float = 0.0) -> Exception:
    """One message for the run's failure: a worker's user error as it was raised there; else the ranks
    that died (named with their node from workers.json), a collective timeout's diagnosis, or the first
    failing rank's error."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = _root_cause(failures[rank], UserError)
        if cause is not None:
            return cause
    placement = read_placement(output_dir)
    died = [rank for rank in sorted(failures) if _is_death(failures[rank])]
    reports = hang_reports(output_dir, since)
    if died and reports:  # NCCL aborted hung ranks after ftcluster named the hang
        return WorkerFailed(f"a collective hung and NCCL stopped the workers; {reports[0]}")
    if died:
        names = ", ".join(describe_rank(placement.get(r), r) for r in died)
        return WorkerFailed(f"worker process died: {names}: {_describe(failures[died[0]], lines=3)}")
    for rank in sorted(failures):
        cause = _root_cause(failures[rank], CollectiveTimeout)
        if cause is not None:
            return WorkerFailed(str(cause))
    if failures:
        rank = min(failures)
        return WorkerFailed(f"worker {describe_rank(placement.get(rank), rank)} failed: {_describe(failures[rank])}")
    return WorkerFailed(str(exc))


def _root_cause(exc: BaseException | None, kind: type) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _is_death(exc: BaseException) -> bool:
    return _root_cause(exc, (ActorDiedError, ActorUnavailableError, WorkerCrashedError)) is not None


def _describe(exc: BaseException, lines: int = 15) -> str:
    return tail(str(exc), lines) or type(exc).__name__
