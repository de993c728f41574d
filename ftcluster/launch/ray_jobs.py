"""`launcher=ray launcher.address=http://HOST:8265`: the whole `ftcluster train` runs as a Ray Job on
that cluster, and `ftcluster jobs` lists, follows and stops such jobs.

Why a job rather than joining the cluster from here: the driver then runs inside the cluster, so the
submitting machine (a laptop, a login node) may go away; launcher.working_dir is shipped with it; and
the cluster keeps the job's log and status. This side checks everything it can first (the config,
the output_dir, that the address answers), then follows the job's log and exits with the job's own
exit code: 0 only when Ray says the job SUCCEEDED.

The job runs `ftcluster train` with the user's overrides unchanged plus `launcher.address=auto`, which
joins the job's own cluster (ftcluster/launch/ray.py) and places the workers there.

Secrets: the dashboard shows every job's entrypoint and runtime_env to anyone who can open it, so a config
holding a secret (a secret-looking key such as launcher.runtime_env.env_vars.HF_TOKEN, or a token-shaped
value) is refused, naming the key, and secret-looking variables are never forwarded. A job reads its secrets
from the cluster's own environment: set them where `ray start` runs (launch/start_head.sh passes its
environment on). Nor is a working_dir shipped that is the home folder or holds credentials. This client
sends the cluster's Ray token (ftcluster/launch/cluster.py, use_token_auth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from ftcluster.errors import ConfigError, UserError
from ftcluster.launch.cluster import check_reachable, token_file, use_token_auth
from ftcluster.launch.submit import refuse_secrets, remote_overrides
from ftcluster.util.secrets import is_secret_name
from ftcluster.util.text import tail

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working dir: environments, VCS data, run outputs. Ray also honours the
# .gitignore and .rayignore files inside working_dir (not those of a parent folder, nor .git itself).
EXCLUDES = [".git", ".venv", "venv", "__pycache__", ".pytest_cache", "*.egg-info", "/runs", "/outputs", "/wandb",
            "checkpoints"]
# Job env defaults. RAY_OVERRIDE_JOB_RUNTIME_ENV: the driver's ray.init(runtime_env=...) sets some of the
# same variables, and Ray refuses to merge two runtime envs that share a key unless this is set.
JOB_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
# Passed on from this shell when set. Not secrets (WANDB_API_KEY, HF_TOKEN): a job's runtime_env is
# shown to anyone who can see the dashboard; give those to the cluster's own environment.
FORWARDED_ENV = ["WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_DATASETS_OFFLINE", "FTCLUSTER_TRACEBACK"]
TAIL_LINES = 20
# Never shipped in a working_dir: what holds credentials (relative paths, matched at any depth).
CREDENTIALS = [".netrc", "_netrc", ".git-credentials", ".pypirc", ".ssh", ".aws/credentials",
               ".cache/huggingface/token", ".cache/huggingface/stored_tokens", ".huggingface/token",
               "huggingface/token", ".ray/auth_token", ".docker/config.json", ".kube/config",
               ".config/gcloud/credentials.db", ".config/gcloud/application_default_credentials.json"]


def submits(cfg: DictConfig) -> bool:
    """A dashboard address means: submit the run as a Ray Job (HOST:6379 joins from this process)."""
    return str(cfg.launcher.address or "").startswith(("http://", "https://"))


def submit(cfg: DictConfig, overrides: list[str], dry_run: bool = False) -> int:
    address = cfg.launcher.address.rstrip("/")
    refuse_secrets(cfg, "and a Ray Job's entrypoint and runtime_env are shown to anyone who can open the cluster's "
                        "dashboard", "Give it to the cluster's own environment instead: set it where `ray start` runs "
                        "(e.g. `export {name}=...` before launch/start_head.sh and launch/join_worker.sh, which pass "
                        "their environment on to every job)")
    entrypoint = shlex.join(["python", "-m", "ftcluster.cli", "train",
                             *remote_overrides(cfg, overrides, "launcher.address=auto")])
    runtime_env = job_runtime_env(cfg)
    if dry_run:  # shows what would be sent; contacts nothing, so it works offline too
        print(f"[ftcluster] would submit a Ray Job to {address}")
        print(f"entrypoint: {entrypoint}")
        print(f"runtime_env: {json.dumps(runtime_env, indent=2)}")
        return 0
    client = _client(address, "launcher.address")
    job_id = f"ftcluster-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                          metadata={"output_dir": cfg.output_dir})
    except (RuntimeError, ValueError) as exc:  # e.g. a working_dir over Ray's upload limit
        raise UserError(f"launcher.address={address}: the cluster refused the job: {exc}") from None
    how = f"--address {shlex.quote(address)}"
    print(f"[ftcluster] submitted Ray Job {job_id} to {address}; output_dir={cfg.output_dir}\n"
          f"[ftcluster]   follow: ftcluster jobs logs {job_id} --follow {how}\n"
          f"[ftcluster]   stop:   ftcluster jobs stop {job_id} {how}", flush=True)
    return _follow(client, job_id, address)


def job_runtime_env(cfg: DictConfig) -> dict:
    """launcher.working_dir (with EXCLUDES) and JOB_ENV, then launcher.runtime_env on top: its keys win,
    except env_vars, which are merged variable by variable."""
    env = {**JOB_ENV, **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and not is_secret_name(k)}}
    runtime_env: dict = {"env_vars": env}
    working_dir = cfg.launcher.working_dir
    if working_dir is not None and "://" in working_dir:
        runtime_env["working_dir"] = working_dir  # a remote package (s3://, https://...zip): Ray fetches it
    elif working_dir is not None:
        path = Path(working_dir).resolve()
        if not path.is_dir():
            raise ConfigError("launcher.working_dir", f"{path} is not a folder; give the folder to ship with "
                                                      f"the job, or null to ship none")
        refuse_credentials(path)
        runtime_env["working_dir"] = str(path)
        runtime_env["excludes"] = [*EXCLUDES, *_inside(Path(cfg.output_dir), path)]
    user = OmegaConf.to_container(cfg.launcher.runtime_env, resolve=True) or {}
    user_env = {k: str(v) for k, v in (user.pop("env_vars", None) or {}).items()}  # Ray takes strings only
    return {**runtime_env, **user, "env_vars": {**env, **user_env}}


def refuse_credentials(folder: Path) -> None:
    """A working_dir is uploaded to the cluster, where every job can read it: never the home folder, never one
    holding credentials (a .gitignore or .rayignore may leave them out, but this side cannot tell)."""
    if folder in (Path.home().resolve(), Path("/")):
        what = "the root folder" if folder == Path("/") else "your home folder"
        raise ConfigError("launcher.working_dir", f"{folder} is {what}, where credentials live (.ssh, tokens, ...); "
                                                  f"ship the project's folder instead (launcher.working_dir=PATH, or "
                                                  f"null to ship none)")
    skip = {name for name in EXCLUDES if "*" not in name and "/" not in name}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        here = Path(root)
        for name in [*files, *dirs]:
            relative = (here / name).relative_to(folder).as_posix()
            if any(relative == c or relative.endswith("/" + c) for c in CREDENTIALS) or relative == "token":
                raise ConfigError("launcher.working_dir", f"{folder} holds credentials ({here / name}), which "
                                                          f"would be uploaded to the cluster with the job; ship a "
                                                          f"folder without them (launcher.working_dir=PATH, or null "
                                                          f"to ship none)")


def _inside(path: Path, folder: Path) -> list[str]:
    """An exclude pattern for `path` when it lies in `folder`: a previous run there is not shipped."""
    try:
        return ["/" + path.resolve().relative_to(folder).as_posix()] if path.resolve() != folder else []
    except ValueError:
        return []


def _client(address: str, key: str):
    """A JobSubmissionClient, after a TCP connect that fails within seconds on a dead address (Ray's
    client has no timeout of its own)."""
    if not urlsplit(address).hostname:
        raise UserError(f"{key}={address}: expected http://HOST:PORT, the cluster's dashboard (port 8265 by default)")
    check_reachable(address, key)
    host_port = urlsplit(address).netloc
    # not at the top: Ray's import takes most of a second, which `ftcluster jobs --help` and --dry-run do without
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed" after each job
    use_token_auth(start=False)
    try:
        return JobSubmissionClient(address)
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as exc:
        if isinstance(exc, AuthenticationError):
            raise UserError(f"{key}={address}: the dashboard refused this client: Ray's token authentication is "
                            f"on there, and {_token_source()}. Set RAY_AUTH_TOKEN_PATH to a copy of the cluster's "
                            f"token file (launch/start_head.sh prints where it is)") from None
        raise UserError(f"{key}={address}: {host_port} answers but not as a Ray dashboard ({exc}). Use the "
                        f"dashboard port (8265 by default); HOST:6379 without http:// joins from this process "
                        f"instead") from None


def _token_source() -> str:
    """Which token this client sent, or that it had none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the token in RAY_AUTH_TOKEN is not the cluster's"
    path = token_file()
    return f"the token in {path} is not the cluster's" if path.is_file() else f"this client has no token (no {path})"


def _follow(client, job_id: str, address: str) -> int:
    """Stream the job's log until it ends; its exit code (0 only for SUCCEEDED)."""
    async def stream():
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    how = f"--address {shlex.quote(address)}"
    try:
        try:
            asyncio.run(stream())
        except Exception as exc:  # aiohttp's errors are not all OSErrors; the job's status still says how it ended
            print(f"[ftcluster] the log stream of {job_id} broke ({exc}); waiting for the job to end", file=sys.stderr)
        info = _wait_terminal(client, job_id, timeout_s=None)
    except KeyboardInterrupt:
        print(f"\n[ftcluster] stopped following; Ray Job {job_id} keeps running on the cluster.\n"
              f"[ftcluster]   follow: ftcluster jobs logs {job_id} --follow {how}\n"
              f"[ftcluster]   stop:   ftcluster jobs stop {job_id} {how}", file=sys.stderr)
        return 130
    except OSError as exc:  # requests' ConnectionError: the dashboard went away
        print(f"[ftcluster] lost contact with {address} ({exc}); Ray Job {job_id} may still be running: "
              f"ftcluster jobs status {job_id} {how}", file=sys.stderr)
        return 1
    if info.status == "SUCCEEDED":
        return 0
    code = info.driver_exit_code
    # Without an exit code the driver never ran or was stopped; Ray's message then says why.
    why = f"driver exit code {code}" if code is not None else ((info.message or "").strip() or "no message")[:300]
    lines = tail(client.get_job_logs(job_id), TAIL_LINES).splitlines()
    print(f"[ftcluster] Ray Job {job_id} ended {info.status}, {why}; last {len(lines)} lines of its log:",
          *lines, sep="\n", file=sys.stderr)
    return 1 if not code else 128 - code if code < 0 else min(code, 255)  # negative: killed by signal -code


def _wait_terminal(client, job_id: str, timeout_s: float | None):
    """The job's details once it is SUCCEEDED, FAILED or STOPPED (the log stream can end a moment
    before the status does); the last details seen when timeout_s runs out."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(0.5)


def _job(client, job_id: str, address: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:  # the client turns every HTTP error into one
        if "404" in str(exc) or "does not exist" in str(exc):
            raise UserError(f"no job {job_id!r} on {address}; `ftcluster jobs list --address {address}` shows "
                            f"its jobs") from None
        raise


def jobs_command(args: list[str]) -> int:
    """`ftcluster jobs list|status ID|logs ID [--follow]|stop ID [--address URL]`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help=f"the cluster's dashboard (default: $RAY_ADDRESS when it is http(s)://, "
                                          f"else {DEFAULT_ADDRESS})")
    parser = argparse.ArgumentParser(prog="ftcluster jobs", description="Ray Jobs on a cluster's dashboard.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", parents=[common], help="every job on the cluster, oldest first")
    for verb, help_text in [("status", "status, message and exit code of a job"), ("logs", "a job's log"),
                            ("stop", "stop a job and wait until it has stopped")]:
        sub = verbs.add_parser(verb, parents=[common], help=help_text)
        sub.add_argument("job_id", metavar="ID")
    verbs.choices["logs"].add_argument("--follow", "-f", action="store_true", help="stream it until the job ends")
    verbs.choices["stop"].add_argument("--timeout", type=float, default=60, help="seconds to wait (default 60)")
    ns = parser.parse_args(args)

    env_address = os.environ.get("RAY_ADDRESS", "")
    address = (ns.address or (env_address if env_address.startswith(("http://", "https://")) else DEFAULT_ADDRESS))
    address = address.rstrip("/")
    client = _client(address, "--address")
    if ns.verb == "list":
        return _list(client, address)
    info = _job(client, ns.job_id, address)
    if ns.verb == "status":
        message = ((info.message or "").strip().splitlines() or [""])[0]  # a failed job's message goes on with its log
        print(f"{ns.job_id}: {info.status}\nmessage: {message}\ndriver exit code: {info.driver_exit_code}\n"
              f"started: {_when(info.start_time)}  ended: {_when(info.end_time)}\nentrypoint: {info.entrypoint}")
        return 0
    if ns.verb == "logs":
        if ns.follow:
            return _follow(client, ns.job_id, address)
        print(client.get_job_logs(ns.job_id), end="")
        return 0
    if info.status.is_terminal():
        print(f"{ns.job_id}: already {info.status}")
        return 0
    client.stop_job(ns.job_id)
    info = _wait_terminal(client, ns.job_id, timeout_s=ns.timeout)
    print(f"{ns.job_id}: {info.status}")
    return 0 if info.status.is_terminal() else 1


def _list(client, address: str) -> int:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        print(f"no jobs on {address}")
        return 0
    rows = [(j.submission_id or j.job_id or "?", str(j.status), _when(j.start_time), _short(j.entrypoint, 70))
            for j in jobs]
    widths = [max(len(r[i]) for r in [("ID", "STATUS", "STARTED", ""), *rows]) for i in range(3)]
    for row in [("ID", "STATUS", "STARTED", "ENTRYPOINT"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)), row[3], sep="  ")
    return 0


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
