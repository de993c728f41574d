"""SPMD workers as plain Ray actors (launcher=local, ray, slurm): what Ray Train's TorchTrainer did for us,
without its controller actor, its worker-group polling and its storage bookkeeping (about 9 s before the first
step on a 2-core machine).

Each rank is one actor on its bundle of one placement group (launcher.placement_strategy; under SLURM each bundle
carries a node-label selector, so ranks are contiguous per node and rank 0 is on the head), started with the
run's worker environment. One call per rank joins the torch process group (env:// rendezvous at rank 0's
address: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT, as torchrun sets
them; on GPUs every rank of a node sees the node's GPUs, so that NCCL can use peer-to-peer) and imports the
entry's libraries; none of that needs the payload, so it can happen while the driver prepares it (launcher=local
starts the ranks early when the data is prepared in the driver). A second call runs the entry.
The first rank to fail ends the attempt: the others get a moment to fail too (a rank that died takes its peers'
collectives with it, and the dead one is the one to name), then every actor is killed. Up to
launcher.max_failures times the whole group is started again; the entry resumes from the newest checkpoint of
its launch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ftcluster.errors import CollectiveTimeout, UserError
from ftcluster.util.net import free_port

# After a rank fails, how long the others get to fail or finish before the group is killed: long enough for a
# peer's broken collective to raise, so that the failure named is the rank that died, not its peers' errors.
GRACE_S = 2.0
# How often the driver looks up from waiting: signal handlers (a stop request) run between looks.
POLL_S = 0.5


class Failed(Exception):
    """One attempt's failure; worker_failures maps rank -> the exception it raised or died with."""

    def __init__(self, worker_failures: dict[int, BaseException], since: float):
        super().__init__("; ".join(f"rank {r}: {type(e).__name__}" for r, e in sorted(worker_failures.items())))
        self.worker_failures, self.since = worker_failures, since


class Rank:
    """One rank's process: a Ray worker of the job, given the run's worker environment by setup() before it
    imports torch (OMP_NUM_THREADS among it, which torch reads once, at its import). Nothing before run() needs
    the payload: a rank can be set up while the driver still prepares it."""

    def where(self) -> dict:
        """Where this rank runs, and a free port (rank 0's becomes the group's master port)."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "port": free_port(""), "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def setup(self, entry: Callable[[dict], None], env: dict, backend: str, timeout_s: int,
              visible_gpus: list[str] | None, gpu: str | None) -> None:
        """Join the process group, and import what the entry will (its preload, where it has one)."""
        os.environ.update(env)
        if visible_gpus:  # before torch first touches CUDA, which reads the variable once
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
        import torch
        import torch.distributed as dist

        if gpu is not None:
            device = visible_gpus.index(gpu)
            torch.cuda.set_device(device)
            os.environ["ACCELERATE_TORCH_DEVICE"] = f"cuda:{device}"
        dist.init_process_group(backend, init_method="env://", rank=int(env["RANK"]),
                                world_size=int(env["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))
        getattr(entry, "preload", lambda: None)()

    def run(self, entry: Callable[[dict], None], payload: dict) -> None:
        entry(payload)


@dataclass(frozen=True)
class RankSpec:
    """What every attempt's ranks are: how many, what each holds, how they are spread, the environment their
    processes start with (worker_env, OMP_NUM_THREADS), their process group's backend and timeout."""
    workers: int
    resources: dict
    strategy: str
    label_selector: list[dict] | None  # one node-label selector per rank, or None
    env: dict
    backend: str
    timeout_s: int
    ready_timeout_s: int


class Ranks:
    """One attempt's rank actors on their own placement group, started at construction; set_up() joins them in a
    process group and has them import the entry's libraries, run() runs the entry (setting them up first if
    that was not done yet). close() kills them and frees their bundles."""

    def __init__(self, entry: Callable[[dict], None], spec: RankSpec):
        self.entry, self.spec, self.started = entry, spec, time.time()
        self.pg = placement_group([dict(spec.resources)] * spec.workers, strategy=spec.strategy,
                                  bundle_label_selector=spec.label_selector)
        self.actors: list = []
        self.setups: list | None = None
        ready, _ = ray.wait([self.pg.ready()], timeout=spec.ready_timeout_s)
        if not ready:
            self.close()
            raise UserError(f"the placement group for {spec.workers} workers ({spec.resources} each) was not ready "
                            f"within launcher.ready_timeout_s={spec.ready_timeout_s}: other jobs hold the resources")
        remote = ray.remote(Rank)
        # No runtime_env of their own: the job's, so that Ray hands them the worker processes it started idle
        # with the job (a second of process start and imports each on a small machine). Their environment is
        # set in setup(), before torch is imported.
        self.actors = [remote.options(num_cpus=spec.resources.get("CPU", 1), num_gpus=spec.resources.get("GPU", 0),
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(
                                          self.pg, placement_group_bundle_index=i)).remote()
                       for i in range(spec.workers)]
        self.places = [actor.where.remote() for actor in self.actors]

    def set_up(self) -> None:
        """Once every rank says where it runs: each is handed its torch environment and starts setting up (not
        waited for here; run() waits). Failed when a rank failed to start."""
        if self.setups is None:
            places = _wait(self.places, self.spec.ready_timeout_s, self.started)
            spec = self.spec
            self.setups = [actor.setup.remote(self.entry, rank_env, spec.backend, spec.timeout_s, visible, gpu)
                           for actor, (rank_env, visible, gpu) in zip(self.actors, _rank_settings(places, spec.env))]

    def run(self, payload: dict) -> None:
        """entry(payload) on every rank; Failed when any rank failed. The actors are gone afterwards."""
        try:
            self.set_up()
            _wait(self.setups, None, self.started)
            _wait([actor.run.remote(self.entry, payload) for actor in self.actors], None, self.started)
        finally:
            self.close()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def run(entry: Callable[[dict], None], payload: dict, spec: RankSpec, max_failures: int,
        on_failure: Callable[[Failed], Exception], first: Ranks | None = None) -> None:
    """entry(payload) on spec.workers ranks (`first`: the first attempt's, started early); on failure, up to
    max_failures fresh attempts, then raise on_failure(the last attempt's Failed). A UserError from a rank is
    raised as is, without a retry."""
    attempt = 0
    while True:
        try:
            ranks, first = first or Ranks(entry, spec), None
            ranks.run(payload)
            return
        except Failed as failed:
            error = on_failure(failed)
            if isinstance(error, UserError) or attempt >= max_failures:
                raise error from None
            attempt += 1
            print(f"[ftcluster] the workers failed ({error}); starting them again, attempt {attempt} of "
                  f"launcher.max_failures={max_failures}", flush=True)


def _rank_settings(places: list[dict], env: dict) -> list[tuple[dict, list[str] | None, str | None]]:
    """Per rank: its torch environment, the GPUs its process sees (every GPU of its node's ranks) and its own."""
    nodes = list(dict.fromkeys(p["node_id"] for p in places))
    master = places[0]
    settings = []
    for rank, place in enumerate(places):
        on_node = [r for r, p in enumerate(places) if p["node_id"] == place["node_id"]]
        rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(len(places)), "LOCAL_RANK": str(on_node.index(rank)),
                    "LOCAL_WORLD_SIZE": str(len(on_node)), "NODE_RANK": str(nodes.index(place["node_id"])),
                    "MASTER_ADDR": master["ip"], "MASTER_PORT": str(master["port"])}
        visible = sorted({g for r in on_node for g in places[r]["gpus"]}, key=lambda g: (len(g), g)) or None
        settings.append((rank_env, visible, place["gpus"][0] if place["gpus"] else None))
    return settings


def _wait(refs: list, timeout_s: float | None, since: float) -> list:
    """Every ref's result; on the first failure, Failed with every rank that failed within GRACE_S of it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending, failures = list(refs), {}
    while pending and not failures:
        if deadline is not None and time.monotonic() > deadline:
            late = ", ".join(f"rank {refs.index(r)}" for r in pending)
            raise UserError(f"{late} did not start within launcher.ready_timeout_s={timeout_s}: the node is "
                            f"overloaded, or Ray cannot start worker processes (see the Ray logs)")
        done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        failures.update(_failures(refs, done))
    if failures:
        grace = time.monotonic() + GRACE_S
        while pending and time.monotonic() < grace:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, grace - time.monotonic()))
            failures.update(_failures(refs, done))
        raise Failed(failures, since)
    return ray.get(refs)


def _failures(refs: list, done: list) -> dict[int, BaseException]:
    found = {}
    for ref in done:
        try:
            ray.get(ref)
        except Exception as exc:  # RayTaskError (wrapping the rank's own), RayActorError (a death)
            cause = getattr(exc, "cause", None)
            # ftcluster's own errors are their message; anything else keeps Ray's text, the rank's traceback
            found[refs.index(ref)] = cause if isinstance(cause, (UserError, CollectiveTimeout)) else exc
    return found
