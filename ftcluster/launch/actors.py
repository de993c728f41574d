"""Actor groups on a Ray cluster: N actors of one class forming one torch process group, placed on
placement-group bundles, colocated with other roles' actors or apart. For the stages that a controller
drives from the launching process (PPO, GRPO): one group per role.

Nothing here knows about models or training: a group starts actors of the class it is given, wires
their process group (rank 0's address, a free port), calls methods on every rank and waits with a
deadline. A call that outlives its deadline, or an actor that dies, fails with one message naming the
role, the rank, its node and its pid: a lost actor never hangs the run.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import ray
from omegaconf import DictConfig
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ftcluster.errors import ActorTimeout, UserError, WorkerFailed
from ftcluster.launch.cluster import WORKER_ENV
from ftcluster.util.net import free_port
from ftcluster.util.text import tail


class GroupMember:
    """Mixed into every actor class a group starts (the class itself knows nothing of placement): the
    actor knows its role, rank and group size, and joins its group's process group (gloo or NCCL).
    The actor class's own constructor gets the remaining arguments."""

    def __init__(self, role: str, rank: int, world_size: int, threads: int, *args):
        self.role, self.rank, self.world_size = role, rank, world_size
        # The actor has no runtime environment of its own (see ActorGroup): its variables are set here, and its
        # threads on torch itself, which the actor class's module may have imported with another count already.
        os.environ.update(WORKER_ENV, RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size),
                          OMP_NUM_THREADS=str(threads))
        import torch

        torch.set_num_threads(threads)
        super().__init__(*args)

    def where(self) -> dict:
        """This actor's node, address, pid, and a free port (rank 0's becomes the group's master port)."""
        return {"node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "pid": os.getpid(),
                "ip": ray.util.get_node_ip_address(), "port": free_port("")}

    def join_group(self, master_addr: str, master_port: int, timeout_s: int) -> None:
        import torch  # here, in the actor's process: the driver imports this module before it needs torch
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if self.world_size > 1 or not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=timeout_s))


class ActorGroup:
    """`count` actors of `actor_class`, rank i on `bundles[i]` of `placement_group`: started at construction,
    without waiting (their processes start and import meanwhile, beside other groups'); join() waits for them
    and joins them in their process group."""

    def __init__(self, role: str, actor_class: type, count: int, placement_group, bundles: list[int],
                 resources: list[dict], timeout_s: int, start_timeout_s: int, *args):
        self.role, self.timeout_s = role, timeout_s
        member = type(actor_class.__name__, (GroupMember, actor_class), {"__module__": actor_class.__module__})
        remote = ray.remote(member)
        # No runtime_env per actor: with one, Ray starts a new worker process for each actor instead of handing
        # it one of those it keeps idle (a second of process start and imports each, on a small machine).
        self.actors = [
            remote.options(
                num_cpus=resources[i].get("CPU", 0), num_gpus=resources[i].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=b),
                # One thread per whole CPU the actor holds, at least one (colocated actors hold fractions).
                ).remote(role, i, count, max(1, int(resources[i].get("CPU", 1))), *args)
            for i, b in enumerate(bundles)]
        self.places = None
        self._starting = (start_timeout_s, [a.where.remote() for a in self.actors])

    def join(self) -> None:
        # Starting a process and importing what it needs can take a while on a busy node.
        start_timeout_s, where = self._starting
        self.places = Pending(self, where, "start", start_timeout_s).get()
        master = self.places[0]
        self.call("join_group", master["ip"], master["port"], self.timeout_s)

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args, per_rank: dict[str, list] | None = None, timeout_s: int | None = None,
             **kwargs) -> list:
        """`method(*args, **kwargs)` on every rank, rank i also getting {name: values[i]} from per_rank;
        the results in rank order, within timeout_s (default: the group's)."""
        return self.call_async(method, *args, per_rank=per_rank, timeout_s=timeout_s, **kwargs).get()

    def call_async(self, method: str, *args, per_rank: dict[str, list] | None = None, timeout_s: int | None = None,
                   **kwargs) -> "Pending":
        per_rank = per_rank or {}
        refs = [getattr(actor, method).remote(*args, **kwargs, **{name: values[i] for name, values in per_rank.items()})
                for i, actor in enumerate(self.actors)]
        return Pending(self, refs, method, timeout_s or self.timeout_s)

    def describe(self, rank: int) -> str:
        place = self.places[rank] if self.places else None
        where = f" (node {place['node']}, {place['ip']}, pid {place['pid']})" if place else ""
        return f"{self.role} rank {rank}{where}"

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


class Pending:
    """Calls in flight on a group's ranks; get() waits for all of them, within timeout_s."""

    def __init__(self, group: ActorGroup, refs: list, what: str, timeout_s: int):
        self.group, self.refs, self.what, self.timeout_s = group, refs, what, timeout_s

    def get(self) -> list:
        deadline = time.time() + self.timeout_s
        pending = list(self.refs)
        while pending:
            # One at a time: a failed rank surfaces at once, not when the slowest one finishes.
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.time()))
            for ref in done:
                try:
                    ray.get(ref)
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
                    if isinstance(cause, UserError):
                        raise cause from None
                    rank = self.refs.index(ref)
                    raise WorkerFailed(f"{self.group.describe(rank)} failed in {self.what}: "
                                       f"{tail(str(exc), 12)}") from None
                except RayActorError as exc:
                    rank = self.refs.index(ref)
                    raise WorkerFailed(f"{self.group.describe(rank)} died in {self.what}: {tail(str(exc), 3)}") from None
            if not done and pending:
                late = ", ".join(self.group.describe(self.refs.index(ref)) for ref in pending)
                raise ActorTimeout(f"{late} did not finish {self.what} within {self.timeout_s} s: stalled or lost "
                                   f"(the deadline is launcher.collective_timeout_s, stage.rl.sync_timeout_s for "
                                   f"weight syncs, launcher.ready_timeout_s for start-up)")
        return ray.get(list(self.refs))


class Placement:
    """Where role groups go on the connected Ray cluster: one set of bundles shared by colocated roles,
    or a placement group per role. Each bundle is one worker slot (launcher.cpus_per_worker CPUs and, on
    GPU machines, one GPU); colocated actors split their bundle's resources evenly."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.use_gpu = cfg.launcher.use_gpu if cfg.launcher.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        self.groups: list[ActorGroup] = []
        self._pgs: list = []
        self._slots = 0  # bundles held by this placement

    def bundle(self) -> dict:
        return {"CPU": self.cfg.launcher.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}

    def place(self, roles: dict[str, tuple[type, int, tuple]], colocate: bool, timeout_s: int) -> dict[str, ActorGroup]:
        """roles: name -> (actor class, count, constructor args). Returns the started groups by name."""
        roles = {name: spec for name, spec in roles.items() if spec[1] > 0}
        counts = {name: count for name, (_, count, _) in roles.items()}
        self._check_fits(max(counts.values()) if colocate else sum(counts.values()),
                         ("colocated roles " if colocate else "roles ") + ", ".join(f"{n} x{c}" for n, c in counts.items()))
        if colocate:
            slots = max(count for _, count, _ in roles.values())
            pg = self._placement_group(slots, "colocated roles: " + ", ".join(roles))
            sharing = [sum(1 for _, count, _ in roles.values() if i < count) for i in range(slots)]
            layout = {name: (pg, list(range(count)), [self._share(sharing[i]) for i in range(count)])
                      for name, (_, count, _) in roles.items()}
        else:
            layout = {}
            for name, (_, count, _) in roles.items():
                layout[name] = (self._placement_group(count, f"role {name}"), list(range(count)),
                                [self.bundle()] * count)
        started = {}
        for name, (actor_class, count, args) in roles.items():
            pg, bundles, resources = layout[name]
            started[name] = ActorGroup(name, actor_class, count, pg, bundles, resources, timeout_s,
                                       self.cfg.launcher.ready_timeout_s, *args)
            self.groups.append(started[name])
        for group in started.values():  # every group's actors are starting: their imports overlap
            group.join()
        return started

    def _share(self, actors: int) -> dict:
        return {key: value / actors for key, value in self.bundle().items()}

    def _check_fits(self, slots: int, what: str) -> None:
        """Before any placement group is asked for: one that can never be granted would wait forever."""
        total = ray.cluster_resources()
        for resource, amount in self.bundle().items():
            held = amount * self._slots
            if total.get(resource, 0) - held < amount * slots:
                raise UserError(f"{what} need {slots} bundles of {self.bundle()} but the Ray cluster has "
                                f"{total.get(resource, 0):g} {resource}" + (f", {held:g} of them already placed" if held else "")
                                + ": lower launcher.workers or the stage.rl.*_workers, set stage.rl.colocate=true, "
                                  "or add nodes")

    def _placement_group(self, slots: int, what: str):
        pg = placement_group([self.bundle()] * slots, strategy=self.cfg.launcher.placement_strategy)
        ready, _ = ray.wait([pg.ready()], timeout=self.cfg.launcher.ready_timeout_s)
        if not ready:
            raise UserError(f"the placement group for {what} ({slots} x {self.bundle()}) was not ready within "
                            f"launcher.ready_timeout_s={self.cfg.launcher.ready_timeout_s}: other jobs hold the "
                            f"resources, or a node is missing")
        self._pgs.append(pg)
        self._slots += slots
        return pg

    def shutdown(self) -> None:
        for group in self.groups:
            group.kill()
        for pg in self._pgs:
            remove_placement_group(pg)
        self.groups, self._pgs, self._slots = [], [], 0
