"""launcher=slurm, inside the allocation: slurm/ftcluster.sbatch has started a Ray head on the first
node and a Ray worker on each other node and exported FTCLUSTER_RAY_ADDRESS. Join that cluster, wait
until every node and its resources are visible (never a fixed sleep), then place the workers exactly
as launcher=ray does, with ranks contiguous per node and rank 0 (the master address) on the head."""

from __future__ import annotations

import os
import time
from typing import Callable

import ray
from omegaconf import DictConfig

from ftcluster.errors import UserError
from ftcluster.launch import ray as ray_launch
from ftcluster.launch.actors import Placement
from ftcluster.launch.cluster import connect

NODE_LABEL = "ftcluster-node"  # set by slurm/ftcluster.sbatch: 0 on the head, 1.. on the other nodes


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    _join_allocation(cfg)
    # Worker i on node i // per_node (nodes labelled by the sbatch script, the head 0): ranks contiguous
    # per node, rank 0, and so the process group's master address, on the head node.
    per_node = cfg.launcher.workers // cfg.launcher.nodes
    ray_launch.run_workers(entry, payload, cfg, label_selector=[{NODE_LABEL: str(rank // per_node)}
                                                        for rank in range(cfg.launcher.workers)])


def control(entry: Callable[[dict, Placement], None], payload: dict, cfg: DictConfig) -> None:
    _join_allocation(cfg)
    ray_launch.run_controller(entry, payload, cfg)


def _join_allocation(cfg: DictConfig) -> None:
    address = os.environ.get("FTCLUSTER_RAY_ADDRESS")
    if not address:
        raise UserError("launcher=slurm places workers only inside a job started from slurm/ftcluster.sbatch "
                        "(FTCLUSTER_RAY_ADDRESS is not set); submit with `ftcluster train launcher=slurm ...`")
    connect(address, "FTCLUSTER_RAY_ADDRESS", "The Ray head that slurm/ftcluster.sbatch starts on the job's first "
                                              "node is not up: see the job log for why it failed to start")
    wait_for_nodes(cfg.launcher)


def wait_for_nodes(launcher: DictConfig, poll_s: float = 0.5) -> None:
    """Until launcher.nodes nodes are alive with the CPUs and GPUs the workers need, or ready_timeout_s."""
    need_cpus = launcher.workers * launcher.cpus_per_worker
    need_gpus = launcher.nodes * launcher.gpus_per_node
    deadline = time.time() + launcher.ready_timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"] and NODE_LABEL in n.get("Labels", {})]
        cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
        gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
        if len(alive) >= launcher.nodes and cpus >= need_cpus and gpus >= need_gpus:
            print(f"[ftcluster] Ray cluster ready: {len(alive)} nodes, {cpus:g} CPUs, {gpus:g} GPUs", flush=True)
            return
        if time.time() > deadline:
            raise UserError(f"after launcher.ready_timeout_s={launcher.ready_timeout_s} the Ray cluster has "
                            f"{len(alive)} of {launcher.nodes} nodes ({cpus:g} CPUs of {need_cpus}, {gpus:g} GPUs of "
                            f"{need_gpus}); see the job log for a Ray node that failed to start")
        time.sleep(poll_s)
