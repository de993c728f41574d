"""Errors a user can fix. The CLI prints them as one message and exits non-zero, with no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input: config, data, paths. Never a bug in ftcluster."""


class ConfigError(UserError):
    """A config value that cannot work. Names the key, the value and what to do instead."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class DataError(UserError):
    """A data record that cannot be used. Names the file and line (1-based) when there is one."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line = path, line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class WorkerFailed(RuntimeError):
    """A worker or role actor raised something that is not a user error, or died; the message names it
    (rank, node, pid) and carries its traceback tail."""


class ActorTimeout(WorkerFailed):
    """A role's call did not return within its deadline."""


class CollectiveTimeout(RuntimeError):
    """A collective outlived launcher.collective_timeout_s; the message names the ranks that did not arrive."""


class StoppedOnRequest(Exception):
    """The run stopped on a request (SIGUSR1, a stop file) after writing a checkpoint; resume=auto continues."""

    # EX_TEMPFAIL: "checkpointed, run me again"; slurm/ftcluster.sbatch requeues the job on it.
    EXIT_CODE = 75

    def __init__(self, checkpoint):
        super().__init__(f"stopped on request with a checkpoint at {checkpoint}; resume=auto continues the run")
        self.checkpoint = checkpoint
