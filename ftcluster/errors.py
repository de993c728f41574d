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
