"""Joining or starting the Ray cluster this process places work on: its address checked within seconds
(Ray's own client retries for a minute or more), its worker environment, loopback on one machine, and Ray's
token authentication.

Token auth: a cluster this process starts always has it, set explicitly (RAY_AUTH_MODE=token; Ray 2.60 would
otherwise decide by itself, from whether a token file happens to exist). The token is Ray's own: RAY_AUTH_TOKEN,
else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token, created here when missing and kept readable by
its owner only. The same lookup serves every client (joining, `ftcluster jobs`, Ray Job submission)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from ftcluster.errors import UserError

# Ray reads these when its processes start; set before ray.init in this process and passed on: to a cluster
# started here through this process's environment (its Ray processes and workers inherit it), to one joined as
# the job's runtime environment. A local cluster gets no job runtime environment: with one, Ray starts a fresh
# worker process for every actor instead of handing it one of the workers it started idle with the cluster
# (a second of process start and imports before each rank, measured with Ray 2.60).
WORKER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "FTCLUSTER_IN_RAY": "1",
}


def import_ray():
    """The ray module, or a UserError saying that launcher=local, ray and slurm need it."""
    try:
        import ray  # not at the top: the driver imports this module, and launcher=processes and inline run without Ray
    except ImportError as exc:
        raise UserError(f"launcher=local, ray and slurm place workers with Ray, which cannot be imported here "
                        f"({exc}): install it (pip install 'ray[default,data,tune]') or use launcher=processes") from None
    return ray


_START_ONE = "Start a Ray head there (launch/start_head.sh), check the host and port, or use launcher=local"


def connect(address: str | None, key: str = "launcher.address", fix: str = _START_ONE, dashboard: bool = False) -> None:
    """Start a Ray cluster in this process (address None) or join a running one; `key` and `fix` say, in an
    error, where the address came from and what to do. `dashboard`: the cluster started here runs Ray's
    dashboard, and with it the state API (`ray list`, the dashboard's views of actors and Ray Data); off unless
    asked (launcher.dashboard): it costs about a second of the start and a CPU-second on a small machine. A
    cluster that is starting or up already is taken as it is."""
    ray = import_ray()
    if address is None and _starting is not None:
        _starting.wait()
        return
    _set_worker_env()
    check_address(address, key, fix)
    if ray.is_initialized():
        return
    # ray.init replaces this process's SIGTERM handler (with one that exits at once, or that kills the local
    # cluster and exits 1): the command's own, a stop request with a checkpoint (ftcluster.train.stop), is put
    # back. Ray's local processes still go when this one exits (atexit) or dies (they die with their parent).
    handler = signal.getsignal(signal.SIGTERM)
    try:
        _init(ray, address, dashboard)
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


class ClusterStart:
    """connect(None) on a thread: the local cluster's start (seconds, mostly waiting for the processes ray.init
    starts) overlaps what the caller does meanwhile (the driver: its imports, checks and data). connect(None)
    waits for it and raises its error; finish() waits for it when the run does not go ahead."""

    def __init__(self, ray, dashboard: bool):
        # The environment is set here and put back in wait(), never on the thread: os.environ is the whole
        # process's, and the main thread reads it meanwhile.
        _set_worker_env()
        use_token_auth(start=True)
        self._before = _loopback_node()
        self.ray, self.dashboard, self.error = ray, dashboard, None
        # up: set when the start has ended, well or not (error then says why)
        self.up, self._release = threading.Event(), threading.Event()
        # Ray says it set no SIGTERM handler off the main thread: the command keeps its own (wait() restores it).
        logging.getLogger("ray._private.worker").addFilter(_drop_sigterm_notice)
        threading.Thread(target=self._start, name="ftcluster-ray-start", daemon=True).start()

    def _start(self) -> None:
        try:
            _init_local(self.ray, self.dashboard)
        except BaseException as exc:  # raised in the thread that waits for the cluster
            self.error = exc
        finally:
            self.up.set()
        # Ray's processes get SIGKILL when the thread that started them ends (PR_SET_PDEATHSIG is per thread):
        # this one stays until the cluster is released (release_cluster), or the process exits.
        self._release.wait()

    def wait(self) -> None:
        global _starting
        self.up.wait()
        if _starting is self:
            _starting = None
            _restore_loopback(self._before)
        # Ray's core worker put its crash handler on SIGTERM (it prints a stack, then calls ours); only the main
        # thread can put the command's handler (a stop request with a checkpoint) back alone.
        handler = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread() and handler is not None:
            signal.signal(signal.SIGTERM, handler)
        if self.error is not None:
            self._release.set()
            raise self.error
        if self not in _started:
            _started.append(self)

    def finish(self) -> None:
        """The run does not go ahead: the start is waited for (a cluster left half-started would race Ray's own
        shutdown at exit); the cluster stays up, as after a run, until release_cluster or the process's exit."""
        try:
            self.wait()
        except Exception:  # the run's own error is the one to report
            pass


def start_local(dashboard: bool = False) -> ClusterStart | None:
    """Begin starting this process's local cluster (connect(None)) on a thread; None when one is up already."""
    global _starting
    ray = import_ray()
    if ray.is_initialized():
        return None
    if _starting is None:
        _starting = ClusterStart(ray, dashboard)
    return _starting


def _drop_sigterm_notice(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


# The start in progress (connect(None) waits for it), and the threads of started clusters (released with them).
_starting: ClusterStart | None = None
_started: list[ClusterStart] = []


def _set_worker_env() -> None:
    for name, value in WORKER_ENV.items():
        if name != "FTCLUSTER_IN_RAY":
            os.environ.setdefault(name, value)


def _init(ray, address: str | None, dashboard: bool) -> None:
    use_token_auth(start=address is None)
    if address is None:
        before = _loopback_node()
        try:
            _init_local(ray, dashboard)
        finally:
            _restore_loopback(before)
        return
    kwargs = dict(runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True, configure_logging=False)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
        # A wrong or missing token shows only as Ray's "InvalidAuthToken" log line and a failed connect.
        raise UserError(f"launcher.address={address}: cannot join a Ray cluster there ({exc}). Start one "
                        f"with launch/start_head.sh, or use launcher=local; if Ray logged InvalidAuthToken, set "
                        f"RAY_AUTH_TOKEN_PATH to a copy of the cluster's token file") from None


def _init_local(ray, dashboard: bool) -> None:
    # Ray starts its workers at nice 15, below its own daemons: ranks doing the machine's work would lose every
    # contested time slice to the driver, Ray's processes and anything else running there, and a rank whose
    # threads synchronise each step waits for the slowest. Same priority as the command instead, unless
    # RAY_worker_niceness says otherwise (Ray reads it itself).
    system = None if "RAY_worker_niceness" in os.environ else {"worker_niceness": 0}
    # "local": a new cluster even when `ray start` left one running on this machine.
    context = ray.init(address="local", include_dashboard=dashboard, _node_ip_address="127.0.0.1",
                       log_to_driver=True, configure_logging=False, _system_config=system)
    if dashboard and context.dashboard_url:  # 8265, else the free port Ray found
        print(f"[ftcluster] Ray dashboard: http://{context.dashboard_url}", flush=True)


def _loopback_node() -> str | None:
    """Keeps the node, and gloo's master address, on loopback rather than the network card's address, while the
    local cluster starts; returns what to restore: left set, it would stop this process's children (a job,
    `ray start` for another node) from ever forming a multi-node cluster."""
    before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = before or "0"
    return before


def _restore_loopback(before: str | None) -> None:
    if before is None:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)


def use_token_auth(start: bool) -> None:
    """Ray's token authentication for this process (and the Ray processes it starts). Starting a cluster: on,
    with a token file only its owner can read. Joining one or talking to a dashboard: on when a token is at
    hand, unless RAY_AUTH_MODE says otherwise (a cluster someone started without it)."""
    if start:
        ensure_token_file()
        os.environ["RAY_AUTH_MODE"] = "token"
    elif "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file().is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    # not at the top: Ray's import takes most of a second, which `ftcluster jobs --help` does without
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, Config, get_authentication_mode

    wanted = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if (get_authentication_mode() == AuthenticationMode.TOKEN) != wanted:
        Config.initialize("")  # Ray reads RAY_AUTH_MODE when it is imported; a later change needs a re-read
    AuthenticationTokenLoader.instance().reset_cache()  # it may have cached "no token" before the file existed


def token_file() -> Path:
    """Where Ray looks for the token when RAY_AUTH_TOKEN is not set."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ensure_token_file() -> Path | None:
    """The token file, made when missing (at the default place only: a RAY_AUTH_TOKEN_PATH that names no
    file is a mistake to report) and readable by its owner alone. None when RAY_AUTH_TOKEN gives the token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_file()
    if not path.is_file():
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: no such file. Point it at the cluster's token file, or "
                            f"unset it to use (and create) {Path.home() / '.ray' / 'auth_token'}")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Written whole under a private name, then linked into place: a second process starting a cluster at
        # the same moment either wins the link or reads the complete token of the one that did.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, Ray's own format
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    if path.stat().st_mode & 0o077:
        try:
            os.chmod(path, 0o600)  # ray.init and `ray get-auth-token --generate` create it with the umask's mode
        except OSError as exc:
            raise UserError(f"the Ray token file {path} is readable by others and cannot be made private "
                            f"({exc.strerror}): chmod 600 it, or set RAY_AUTH_TOKEN_PATH to a private copy") from None
        print(f"[ftcluster] {path} was readable by other users; made it readable by its owner only (0600)", flush=True)
    return path


def check_reachable(address: str, key: str, fix: str = _START_ONE, timeout_s: float = 5.0,
                    shown: str | None = None) -> None:
    """A TCP connect first: ray.init on a dead address retries for a minute or more before failing. `shown`: how
    the error gives the key's value, when `address` was found from it rather than written."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"{key}={shown or address}: nothing answers at {host}:{port} ({exc.strerror or exc}). "
                        f"{fix}") from None


def check_address(address: str | None, key: str = "launcher.address", fix: str = _START_ONE) -> None:
    """A UserError within seconds when nothing answers at the cluster `address` names (None: one to start here,
    nothing to check; "auto": where Ray would look)."""
    if address == "auto":
        found = _found_address(key, fix)
        check_reachable(found, key, fix, shown=f"auto (found as {found}: RAY_ADDRESS, else the cluster last started "
                                               f"on this machine, which may have stopped since)")
    elif address is not None:
        check_reachable(address, key, fix)


def _found_address(key: str, fix: str) -> str:
    """What Ray makes of address "auto": RAY_ADDRESS, else the cluster `ray start` last recorded on this machine
    (a file Ray leaves behind when that cluster dies), else a GCS process found running here."""
    from ray._private.services import canonicalize_bootstrap_address_or_die  # Ray's own lookup, to check it first

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise UserError(f"{key}=auto: no Ray cluster found on this machine ({exc}). {fix}") from None


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


def release_cluster() -> None:
    """Disconnect from Ray (stopping it if this process started it), when Ray is imported and connected."""
    ray = sys.modules.get("ray")
    if _starting is not None:
        _starting.finish()
    if ray is not None and ray.is_initialized():
        _kill_autoscaler_monitor(ray)
        ray.shutdown()
    while _started:
        _started.pop()._release.set()


def _kill_autoscaler_monitor(ray) -> None:
    """Ray's shutdown (2.60) stops the GCS before the autoscaler's monitor, whose SIGTERM handler then writes the
    news to that GCS and waits on it until Ray kills it a second later: a second of every local cluster's stop.
    A cluster this process started is one machine's, with nothing for an autoscaler to do: its monitor is killed
    first, outright. Nothing is done for a joined cluster (this process runs none of its processes), nor where
    Ray's internals differ (the shutdown is then as slow as before, no worse)."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    processes = getattr(getattr(worker, "_global_node", None), "all_processes", None)
    if not isinstance(processes, dict):
        return
    for info in processes.pop("monitor", []):  # popped: Ray's shutdown then has no monitor left to wait for
        process = getattr(info, "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=5)
