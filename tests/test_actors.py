"""Role placement for the RL stages on a real Ray cluster: actor groups with their own process groups,
colocated on shared bundles or apart, and calls that fail loudly (naming role, rank, node and pid)
instead of hanging."""

import pytest
from omegaconf import OmegaConf
from ray import cloudpickle

import actor_roles
from actor_roles import Echo
from ftcluster.config import TrainConfig
from ftcluster.errors import UserError
from ftcluster.launch.cluster import connect
from ftcluster.errors import ActorTimeout
from ftcluster.launch.actors import Placement
from ftcluster.errors import WorkerFailed

# Slow tier: Ray actor groups on this process's Ray cluster.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg():
    connect(address=None)  # the in-process cluster the other tests share (2 CPUs here)
    cloudpickle.register_pickle_by_value(actor_roles)  # tests/ is not on the workers' path
    conf = OmegaConf.structured(TrainConfig)
    conf.launcher.use_gpu = False
    return conf


def test_colocated_roles_share_bundles_and_each_group_has_its_own_process_group(cfg):
    placement = Placement(cfg)
    try:
        groups = placement.place({"policy": (Echo, 2, ()), "critic": (Echo, 1, ())}, colocate=True, timeout_s=60)
        policy, critic = (groups[name].call("placed") for name in ("policy", "critic"))
        assert [(p["rank"], p["world"]) for p in policy] == [(0, 2), (1, 2)]
        assert [(c["rank"], c["world"]) for c in critic] == [(0, 1)]
        assert len({p["pg"] for p in policy + critic}) == 1  # one placement group for every role
        # bundle 0 holds policy rank 0 and the critic: half a CPU each; bundle 1 policy rank 1 alone
        assert [p["bundle"]["CPU"] for p in policy] == [0.5, 1.0] and critic[0]["bundle"]["CPU"] == 0.5
        assert groups["policy"].call("total", 3) == [6, 6] and groups["critic"].call("total", 3) == [3]
        # No runtime environment of their own: the group sets their variables and their torch threads (one per
        # whole CPU held, at least one).
        environments = groups["policy"].call("environment") + groups["critic"].call("environment")
        assert environments == [{"threads": 1, "omp": "1", "in_ray": "1"}] * 3
    finally:
        placement.shutdown()


def test_separate_roles_get_placement_groups_of_their_own_and_what_cannot_fit_is_refused(cfg):
    placement = Placement(cfg)
    try:
        groups = placement.place({"policy": (Echo, 1, ()), "critic": (Echo, 1, ())}, colocate=False, timeout_s=60)
        policy, critic = (groups[name].call("placed")[0] for name in ("policy", "critic"))
        assert policy["pg"] != critic["pg"] and policy["bundle"]["CPU"] == critic["bundle"]["CPU"] == 1.0
        with pytest.raises(UserError, match=r"roles reward x1 need 1 bundles of .* has 2 CPU, 2 of them already "
                                            r"placed: .* set stage.rl.colocate=true"):
            placement.place({"reward": (Echo, 1, ())}, colocate=False, timeout_s=60)
    finally:
        placement.shutdown()


def test_a_stalled_or_dead_actor_fails_the_call_naming_it(cfg):
    placement = Placement(cfg)
    try:
        group = placement.place({"rollout": (Echo, 2, ())}, colocate=True, timeout_s=3)["rollout"]
        pids = [p["pid"] for p in group.call("placed")]
        with pytest.raises(ActorTimeout, match=rf"^rollout rank 1 \(node .*, pid {pids[1]}\) did not finish stall_on "
                                               r"within 3 s: stalled or lost"):
            group.call("stall_on", 1, 60)
        with pytest.raises(WorkerFailed, match=rf"^rollout rank 0 \(node .*, pid {pids[0]}\) died in die_on"):
            group.call("die_on", 0, timeout_s=30)
    finally:
        placement.shutdown()


def test_workers_of_a_local_cluster_run_at_the_commands_priority(cfg):
    """Ray starts its workers at nice 15: a rank there got a slice in ~30 of a core that anything else wanted
    (a 2-core machine with one busy process: 2.9 s a step against 0.24 s). A cluster ftcluster starts keeps them
    at the command's own niceness."""
    import os

    import ray

    def niceness() -> int:
        return os.nice(0)

    assert ray.get(ray.remote(num_cpus=1)(niceness).remote()) == niceness()
