"""Places the workers with Ray Train: one TorchTrainer worker per GPU (or per cpus_per_worker CPUs),
a torch process group among them (NCCL on GPU, gloo on CPU), and the worker entry run in each.

Nothing here knows about stages or models: it gets a callable and a plain-data payload.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from omegaconf import DictConfig

from ftcluster.errors import UserError
from ftcluster.observe.watchdog import CollectiveTimeout, describe_rank, read_placement

# Ray reads these when its processes start; set before ray.init in this process and passed on.
WORKER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "FTCLUSTER_IN_RAY": "1",
    # Ray Train re-logs every print through its own logger, which reaches the driver twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # After a failure Ray Train waits this long for every worker to destroy its process group; a hung
    # worker never does, and a healthy one takes milliseconds (default 30 s).
    "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5",
}


def connect(address: str | None) -> None:
    """Start a Ray cluster in this process (address None) or join a running one."""
    try:
        import ray
    except ImportError as exc:
        raise UserError(f"launcher=local, ray and slurm place workers with Ray, which cannot be imported here "
                        f"({exc}): install it (pip install 'ray[default,train]') or use launcher=processes") from None

    for key, value in WORKER_ENV.items():
        if key != "FTCLUSTER_IN_RAY":
            os.environ.setdefault(key, value)
    if address not in (None, "auto"):
        check_reachable(address, "launcher.address")
    if ray.is_initialized():
        return
    kwargs = dict(runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True, configure_logging=False)
    if address is None:
        # Keeps the node, and gloo's master address, on loopback rather than the network card's address;
        # only while the local cluster starts: left set, it would stop this process's children (a job,
        # `ray start` for another node) from ever forming a multi-node cluster.
        before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = before or "0"
        try:
            # "local": a new cluster even when `ray start` left one running on this machine. The dashboard
            # (on 8265, else a free port) serves the state API that Ray Train's placement-group cleaner polls.
            ray.init(address="local", include_dashboard=True, _node_ip_address="127.0.0.1", **kwargs)
        finally:
            if before is None:
                del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
        return
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"launcher.address={address}: cannot join a Ray cluster there ({exc}). Start one "
                        f"with launch/start_head.sh, or use launcher=local") from None


def check_reachable(address: str, key: str, timeout_s: float = 5.0) -> None:
    """A TCP connect first: ray.init on a dead address retries for a minute or more before failing."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"{key}={address}: nothing answers at {host}:{port} ({exc.strerror or exc}). Start a Ray "
                        f"head there (launch/start_head.sh), check the host and port, or use launcher=local") from None


def _host_port(address: str) -> tuple[str, int]:
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    default = {"http": 80, "https": 443, "ray": 10001}.get(parsed.scheme, 6379)
    try:
        port = parsed.port or default
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise UserError(f"launcher.address={address}: expected HOST:PORT, ray://HOST:PORT or http://HOST:PORT")
    return parsed.hostname, port


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    """launcher=ray: join the running cluster at launcher.address and place the workers there."""
    connect(address=cfg.launcher.address)
    run(entry, payload, cfg)


def run(entry: Callable[[dict], None], payload: dict, cfg: DictConfig,
        label_selector: list[dict] | None = None) -> None:
    """Run `entry(payload)` on launcher.workers Ray Train workers; raise when any of them failed.
    label_selector: one node-label selector per rank, to pin ranks to nodes.
    A `Controller` entry runs here instead, in this process, and places its own actor groups."""
    from ftcluster.launch.actors import Controller, Placement

    if isinstance(entry, Controller):
        placement = Placement(cfg)
        try:
            entry.fn(payload, placement)
        finally:
            placement.shutdown()
        return
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import ray

    launcher = cfg.launcher
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = launcher.use_gpu if launcher.use_gpu is not None else gpus > 0
    _check_capacity(launcher, use_gpu)
    resources = {"CPU": launcher.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        entry,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=launcher.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=launcher.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=launcher.placement_strategy, label_selector=label_selector),
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(Path(cfg.output_dir, "ray").resolve()),
                             failure_config=FailureConfig(max_failures=launcher.max_failures)),
    )
    from ray.train import TrainingFailedError

    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise _worker_error(exc, cfg.output_dir) from None


def _check_capacity(launcher: DictConfig, use_gpu: bool) -> None:
    import ray

    total = ray.cluster_resources()
    need = {"CPU": launcher.workers * launcher.cpus_per_worker, **({"GPU": launcher.workers} if use_gpu else {})}
    for resource, amount in need.items():
        if total.get(resource, 0) < amount:
            raise UserError(f"launcher.workers={launcher.workers} needs {amount:g} {resource} but the Ray cluster has "
                            f"{total.get(resource, 0):g}; lower launcher.workers or add nodes")


def _worker_error(exc: Exception, output_dir: str) -> Exception:
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


class WorkerFailed(RuntimeError):
    """A worker raised something that is not a user error; the message carries its traceback tail."""


def _root_cause(exc: BaseException | None, kind: type) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _is_death(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, WorkerCrashedError

    return _root_cause(exc, (ActorDiedError, ActorUnavailableError, WorkerCrashedError)) is not None


def _describe(exc: BaseException, lines: int = 15) -> str:
    text = str(exc).strip().splitlines()
    return "\n".join(text[-lines:]) if text else type(exc).__name__
