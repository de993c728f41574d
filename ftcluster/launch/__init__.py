"""Launchers place processes and run what they are handed; they know no stage, RL role or model.

A launcher is a module with the two functions of `Launcher`. The driver picks one by `launcher.name` and
hands it an entry: the worker entry for SPMD stages (run on every rank), or a controller for stages whose
roles are actor groups (run here, with a `Placement` that starts those groups on the cluster).
A submitter (`Submitter`) instead ships the whole `ftcluster train` to run elsewhere (a Ray Job, a SLURM job).
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

from omegaconf import DictConfig

from ftcluster.launch.cluster import import_ray

# launcher.name -> module; imported only when chosen (Ray is not needed by processes or inline).
LAUNCHERS = {"local": "ftcluster.launch.ray", "ray": "ftcluster.launch.ray", "slurm": "ftcluster.launch.slurm",
             "processes": "ftcluster.launch.processes", "inline": "ftcluster.launch.inline"}
# The launchers that place workers with Ray: their modules import it at the top.
RAY_LAUNCHERS = ("local", "ray", "slurm")
# launcher.name -> the module that can ship the run as a job; its submits(cfg) says whether this process submits.
SUBMITTERS = {"ray": "ftcluster.launch.ray_jobs", "slurm": "ftcluster.launch.sbatch"}


class Launcher(Protocol):
    def launch(self, entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
        """Run entry(payload) on launcher.workers ranks joined in one torch process group; raise
        ftcluster.errors.WorkerFailed (or the worker's UserError) when any rank failed."""

    def control(self, entry: Callable[[dict, object], None], payload: dict, cfg: DictConfig) -> None:
        """Run entry(payload, placement) in this process; `placement` starts actor groups on the cluster
        (ftcluster.launch.actors.Placement). Launchers without Ray refuse with a UserError."""

    # Optional: start_early(entry, cfg, data_on_cluster) starts what takes seconds before the payload exists
    # (launcher=processes: the ranks, which import the entry's libraries; launcher=local: its Ray cluster, and
    # its ranks too unless the data preparation may use the cluster's CPUs) while the driver checks the run and
    # prepares the data; it returns None, or an object whose launch(payload) runs the entry, and whose close()
    # stops what it started if the run does not launch.


class Submitter(Protocol):
    def submits(self, cfg: DictConfig) -> bool:
        """Whether this process only submits the run (True) or is already where it runs (False)."""

    def submit(self, cfg: DictConfig, overrides: list[str], dry_run: bool = False) -> int:
        """Ship `ftcluster train` with these overrides; follow it; its exit code. The config is validated
        and the resume policy checked before this is called."""


def launcher_for(name: str) -> Launcher:
    if name in RAY_LAUNCHERS:
        import_ray()  # where Ray is missing: the UserError naming launcher=processes, not an ImportError
    return importlib.import_module(LAUNCHERS[name])


def submitter_for(cfg: DictConfig) -> Submitter | None:
    """The submitter when this invocation only submits the run, else None."""
    name = SUBMITTERS.get(cfg.launcher.name)
    module = importlib.import_module(name) if name else None
    return module if module is not None and module.submits(cfg) else None
