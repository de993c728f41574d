"""Joining or starting the Ray cluster this process places work on: its address checked within seconds
(Ray's own client retries for a minute or more), its worker environment, loopback on one machine."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from ftcluster.errors import UserError

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


def import_ray():
    """The ray module, or a UserError saying that launcher=local, ray and slurm need it."""
    try:
        import ray  # not at the top: the driver imports this module, and launcher=processes and inline run without Ray
    except ImportError as exc:
        raise UserError(f"launcher=local, ray and slurm place workers with Ray, which cannot be imported here "
                        f"({exc}): install it (pip install 'ray[default,train]') or use launcher=processes") from None
    return ray


def connect(address: str | None) -> None:
    """Start a Ray cluster in this process (address None) or join a running one."""
    ray = import_ray()
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
