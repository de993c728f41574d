"""Places the workers with Ray Train: one TorchTrainer worker per GPU (or per cpus_per_worker CPUs),
a torch process group among them (NCCL on GPU, gloo on CPU), and the worker entry run in each.

Nothing here knows about stages or models: it gets a callable and a plain-data payload.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from ftcluster.errors import UserError

# Ray reads these when its processes start; set before ray.init in this process and passed on.
WORKER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "FTCLUSTER_IN_RAY": "1",
}


def connect(address: str | None) -> None:
    """Start a Ray cluster in this process (address None) or join a running one."""
    import ray

    for key, value in WORKER_ENV.items():
        if key != "FTCLUSTER_IN_RAY":
            os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    kwargs = dict(runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True, configure_logging=False)
    if address is None:
        # Keeps the node, and gloo's master address, on loopback rather than the network card's address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"launcher.address={address}: cannot reach a Ray cluster there ({exc}). Start one "
                            f"with launch/start_head.sh, or use launcher=local") from None


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    """launcher=ray: join the running cluster at launcher.address and place the workers there."""
    connect(address=cfg.launcher.address)
    run(entry, payload, cfg)


def run(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    """Run `entry(payload)` on launcher.workers Ray Train workers; raise when any of them failed."""
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
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=launcher.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=launcher.placement_strategy),
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(Path(cfg.output_dir, "ray").resolve()),
                             failure_config=FailureConfig(max_failures=launcher.max_failures)),
    )
    from ray.train import TrainingFailedError

    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise _worker_error(exc) from None


def _check_capacity(launcher: DictConfig, use_gpu: bool) -> None:
    import ray

    total = ray.cluster_resources()
    need = {"CPU": launcher.workers * launcher.cpus_per_worker, **({"GPU": launcher.workers} if use_gpu else {})}
    for resource, amount in need.items():
        if total.get(resource, 0) < amount:
            raise UserError(f"launcher.workers={launcher.workers} needs {amount:g} {resource} but the Ray cluster has "
                            f"{total.get(resource, 0):g}; lower launcher.workers or add nodes")


def _worker_error(exc: Exception) -> Exception:
    """The first worker's user error as it was raised there, else a WorkerFailed naming rank and cause."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = _root_user_error(failures[rank])
        if cause is not None:
            return cause
    if failures:
        rank = min(failures)
        return WorkerFailed(f"worker rank {rank} failed: {_describe(failures[rank])}")
    return WorkerFailed(str(exc))


class WorkerFailed(RuntimeError):
    """A worker raised something that is not a user error; the message carries its traceback tail."""


def _root_user_error(exc: BaseException | None) -> UserError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return "\n".join(text[-15:]) if text else type(exc).__name__
