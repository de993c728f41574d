"""Light role actors for tests/test_actors.py: real Ray actors and a real process group, no model."""

import os
import time


class Echo:
    """Its role, rank and world_size come from the group it is placed in."""

    def placed(self) -> dict:
        import ray
        import torch.distributed as dist

        context = ray.get_runtime_context()
        return {"role": self.role, "rank": dist.get_rank(), "world": dist.get_world_size(), "pid": os.getpid(),
                "bundle": context.get_assigned_resources(), "pg": context.get_placement_group_id()}

    def environment(self) -> dict:
        import torch

        return {"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
                "in_ray": os.environ.get("FTCLUSTER_IN_RAY")}

    def total(self, value: int) -> int:
        """An all-reduce over the group's process group."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value])
        dist.all_reduce(tensor)
        return int(tensor)

    def stall_on(self, rank: int, seconds: float) -> int:
        if self.rank == rank:
            time.sleep(seconds)
        return self.rank

    def die_on(self, rank: int) -> int:
        if self.rank == rank:
            os._exit(1)
        return self.rank
