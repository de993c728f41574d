"""launcher=local and launcher=ray: a Ray cluster started in this process (local) or the running one at
launcher.address (ray), and the workers placed there as rank actors (launch/ray_workers.py): one per GPU (or per
cpus_per_worker CPUs), a torch process group among them (NCCL on GPU, gloo on CPU), and the worker entry run in
each. A controller entry (RL) runs in this process with a Placement for its actor groups instead.

Nothing here knows about stages or models: it gets a callable and a plain-data payload.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import ray
from omegaconf import DictConfig
from ray.exceptions import ActorDiedError, ActorUnavailableError, WorkerCrashedError

from ftcluster.errors import CollectiveTimeout, UserError, WorkerFailed
from ftcluster.launch import ray_workers
from ftcluster.launch.actors import Placement
from ftcluster.launch.cluster import WORKER_ENV, ClusterStart, connect, start_local
from ftcluster.launch.worker_env import worker_env
from ftcluster.observe.placement import HANG_REPORT, describe_rank, nccl_timeout_s, read_placement
from ftcluster.util.text import tail


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    connect(_address(cfg), dashboard=cfg.launcher.dashboard)
    run_workers(entry, payload, cfg)


def start_early(entry: Callable[[dict], None], cfg: DictConfig, data_on_cluster: bool) -> "ClusterFirst | None":
    """launcher=local: its cluster starts now, on a thread, while the driver checks the run and prepares the data
    (which waits for it where it needs Ray). The ranks are placed as soon as the cluster is up and import their
    libraries meanwhile, unless the data preparation may use the cluster (`data_on_cluster`): on a machine whose
    CPUs they fill, ranks holding their bundles would starve Ray Data's encoders."""
    if cfg.launcher.name != "local":
        return None
    start = start_local(cfg.launcher.dashboard)
    return ClusterFirst(entry, cfg, start, place_ranks=not data_on_cluster) if start is not None else None


class ClusterFirst:
    """The early start of launcher=local: launch() waits for the cluster, then runs the entry on the ranks placed
    early (a thread placed them once the cluster was up), or on ranks placed now."""

    def __init__(self, entry: Callable[[dict], None], cfg: DictConfig, start: ClusterStart, place_ranks: bool):
        self.entry, self.cfg, self.start = entry, cfg, start
        self.ranks: ray_workers.Ranks | None = None
        # Set when the run does not go ahead (a data error, a stop): ranks not placed yet are not placed at all,
        # so the refusal does not wait for them.
        self.closing = threading.Event()
        self.placing = (threading.Thread(target=self._place, name="ftcluster-early-ranks", daemon=True)
                        if place_ranks else None)
        if self.placing is not None:
            self.placing.start()

    def _place(self) -> None:
        self.start.up.wait()
        if self.start.error is not None or self.closing.is_set():
            return  # a start error is the driver's to report when it waits for the cluster
        try:
            self.ranks = ray_workers.Ranks(self.entry, _rank_spec(self.cfg, None))
            if not self.closing.is_set():
                self.ranks.set_up()
        except Exception:  # an early start that fails is dropped: launch() starts ranks anew and reports the error
            self._drop_ranks()

    def launch(self, payload: dict) -> None:
        connect(None)
        self._join()
        ranks, self.ranks = self.ranks, None
        run_workers(self.entry, payload, self.cfg, first=ranks)

    def close(self) -> None:
        self.closing.set()
        self._join()
        self._drop_ranks()
        self.start.finish()

    def _join(self) -> None:
        if self.placing is not None:
            self.placing.join()

    def _drop_ranks(self) -> None:
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None


def control(entry: Callable[[dict, Placement], None], payload: dict, cfg: DictConfig) -> None:
    connect(_address(cfg), dashboard=cfg.launcher.dashboard)
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


def _rank_spec(cfg: DictConfig, label_selector: list[dict] | None) -> ray_workers.RankSpec:
    launcher = cfg.launcher
    use_gpu = launcher.use_gpu if launcher.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    _check_capacity(launcher, use_gpu)
    backend = "nccl" if use_gpu else "gloo"
    return ray_workers.RankSpec(
        workers=launcher.workers, resources={"CPU": launcher.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        strategy=launcher.placement_strategy, label_selector=label_selector,
        env={**worker_env(cfg, backend), "OMP_NUM_THREADS": str(launcher.cpus_per_worker), **WORKER_ENV},
        backend=backend,
        # gloo raises in Python at the timeout and the worker names the hang itself; NCCL waits longer (worker_env).
        timeout_s=nccl_timeout_s(launcher.collective_timeout_s) if backend == "nccl" else launcher.collective_timeout_s,
        ready_timeout_s=launcher.ready_timeout_s)


def run_workers(entry: Callable[[dict], None], payload: dict, cfg: DictConfig,
                label_selector: list[dict] | None = None, first: ray_workers.Ranks | None = None) -> None:
    """Run `entry(payload)` on launcher.workers rank actors (launch/ray_workers.py; `first`: ranks placed
    already, for the first attempt); raise when any of them failed, after launcher.max_failures restarts of the
    whole group. label_selector: one node-label selector per rank, to pin ranks to nodes (launcher=slurm)."""
    ray_workers.run(entry, payload, _rank_spec(cfg, label_selector), max_failures=cfg.launcher.max_failures,
                    on_failure=lambda failed: _worker_error(failed, cfg.output_dir, since=failed.since), first=first)


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


def _worker_error(exc: ray_workers.Failed, output_dir: str, since: float) -> Exception:
    """One message for an attempt's failure: a worker's user error as it was raised there; else the ranks
    that died (named with their node from workers.json), a collective timeout's diagnosis, or the first
    failing rank's error."""
    failures = exc.worker_failures
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
    rank = min(failures)  # a Failed names at least one rank
    return WorkerFailed(f"worker {describe_rank(placement.get(rank), rank)} failed: {_describe(failures[rank])}")


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
