"""What the submitting launchers (a Ray Job, a SLURM batch job) share: the overrides the remote
`ftcluster train` runs with, quoted so that they arrive byte for byte. (The driver validates the config and
the resume policy before a submitter is called.)"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftcluster.errors import ConfigError
from ftcluster.util.secrets import find_secrets, is_secret_name

_PLAIN = re.compile(r"^[A-Za-z0-9_./:-]*$")


def remote_overrides(cfg: DictConfig, overrides: list[str], *extra: str) -> list[str]:
    """The user's overrides byte for byte, then output_dir made absolute (the job runs in another
    working directory), then the launcher's own."""
    return [*overrides, f"output_dir={hydra_quote(str(Path(cfg.output_dir).resolve()))}", *extra]


def hydra_quote(value: str) -> str:
    """A value as Hydra's override grammar reads it back unchanged."""
    if _PLAIN.match(value):
        return value
    # Hydra reads a backslash as an escape only in front of a quote (or the closing quote).
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{escaped}'"


def refuse_secrets(cfg: DictConfig, shown: str, instead: str) -> None:
    """No secret may travel in what a submitter ships (`shown` says where it would be seen); `instead` says how
    to give it to the job through its environment, with {name} for the variable to set."""
    found = find_secrets(OmegaConf.to_container(cfg, resolve=True))
    if not found:
        return
    others = f" (and {', '.join(found[1:])})" if found[1:] else ""
    name = found[0].rsplit(".", 1)[-1]
    name = name if is_secret_name(name) else "HF_TOKEN"
    raise ConfigError(found[0], f"holds a secret{others}, {shown}. {instead.format(name=name)}, and leave it out "
                                f"of the config and overrides")
