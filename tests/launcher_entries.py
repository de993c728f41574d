"""Worker entries for launcher=processes tests, in a module of their own: each spawned rank imports the
module its entry lives in, and this one imports almost nothing."""

import json
import os
import time

import torch
import torch.distributed as dist

from ftcluster.errors import UserError


def wait_in_a_collective_or_fail(payload):
    """Rank 0 joins the group and waits in a barrier that rank 1 never reaches; rank 1 fails as told."""
    if os.environ["RANK"] == "0":
        with open(payload["pid_file"], "w") as f:
            f.write(str(os.getpid()))
        dist.init_process_group("gloo")
        dist.barrier()
        return
    deadline = time.monotonic() + 120
    while not os.path.exists(payload["pid_file"]) and time.monotonic() < deadline:  # rank 0 is on its way in
        time.sleep(0.05)
    if payload["fail_with"] == "user":
        raise UserError("data.path: bad record on rank 1")
    if payload["fail_with"] == "crash":
        os._exit(9)  # dies without a word, as a process killed for memory does
    raise ValueError("boom on rank 1")


def report_environment(payload):
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
            "FTCLUSTER_RUN_DIR")
    with open(f"{payload['dir']}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump({**{k: os.environ.get(k) for k in keys}, "torch_threads": torch.get_num_threads()}, f)
