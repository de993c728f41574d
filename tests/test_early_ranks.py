"""launcher=local places its ranks while the driver prepares the data: they join the process group and import
the entry's libraries (its preload) before the payload exists, and the same processes then run the entry. When
the data preparation may use the cluster's CPUs (Ray Data's encoders), no rank is placed before the launch."""

import time
from pathlib import Path

import pytest
import ray

from ftcluster.config.compose import compose
from ftcluster.launch import ray as ray_launcher
from ftcluster.launch.cluster import connect, release_cluster
from ftcluster.launch.entry import EntryByName
from helpers import TINY

ENTRY = EntryByName("preload_entry", "run")
TESTS = Path(__file__).resolve().parent


def notes(folder: Path, what: str) -> set[tuple[str, str]]:
    """(rank, pid) of each note `what` in the folder."""
    return {tuple(p.name.split("-")[1:]) for p in folder.glob(f"{what}-*")}


@pytest.mark.slow
def test_local_ranks_are_set_up_before_the_payload_and_run_it_in_the_same_processes(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the ranks import the entry's module from here
    release_cluster()  # a cluster another test left up would be used as is, without an early start
    cfg = compose([*TINY, "launcher=local", f"output_dir={tmp_path}"])
    early = ray_launcher.start_early(ENTRY, cfg, data_on_cluster=False)
    try:
        deadline = time.monotonic() + 120
        while len(notes(tmp_path, "preloaded")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(notes(tmp_path, "preloaded")) == 2, "the ranks did not preload before the payload existed"
        assert not notes(tmp_path, "ran")
        early.launch({})
    finally:
        early.close()
    assert notes(tmp_path, "ran") == notes(tmp_path, "preloaded") and {r for r, _ in notes(tmp_path, "ran")} == {"0", "1"}
    assert "Ray dashboard" not in capfd.readouterr().out  # launcher.dashboard is off unless asked
    release_cluster()


@pytest.mark.slow
def test_no_rank_is_placed_early_when_the_data_may_use_the_cluster(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    release_cluster()
    cfg = compose([*TINY, "launcher=local", "launcher.dashboard=true", f"output_dir={tmp_path}"])
    early = ray_launcher.start_early(ENTRY, cfg, data_on_cluster=True)
    try:
        connect(None)  # the cluster is up
        time.sleep(2)
        assert ray.util.placement_group_table() == {}, "ranks were placed while the data might need the CPUs"
        early.launch({})
        # launcher.dashboard=true: its address said, and the state API it serves answers
        assert "[ftcluster] Ray dashboard: http://127.0.0.1:" in capfd.readouterr().out
        from ray.util.state import list_nodes

        # this cluster's address, not Ray's guess (the newest cluster started on the machine, alive or not)
        assert len(list_nodes(address=ray.get_runtime_context().gcs_address)) == 1
    finally:
        early.close()
    assert {r for r, _ in notes(tmp_path, "ran")} == {"0", "1"}
    assert notes(tmp_path, "ran") == notes(tmp_path, "preloaded")
    release_cluster()


@pytest.mark.slow
def test_releasing_a_local_cluster_stops_its_monitor_before_ray_and_leaves_no_process(monkeypatch):
    """Ray 2.60's shutdown stops the GCS first; the autoscaler's monitor then spends a second, until it is killed,
    reporting its SIGTERM to that GCS. release_cluster kills the monitor while the GCS is still up."""
    import psutil

    release_cluster()
    connect(None)
    monitor = ray._private.worker._global_node.all_processes["monitor"][0].process
    started = {p.pid for p in psutil.Process().children(recursive=True)}
    assert monitor.pid in started and monitor.poll() is None
    at_shutdown = []
    shutdown = ray.shutdown
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: (at_shutdown.append(monitor.poll()), shutdown(*a, **k)))
    release_cluster()
    assert at_shutdown and at_shutdown[0] is not None, "the monitor was still running when Ray's shutdown began"
    assert not ray.is_initialized()
    assert not [p for p in psutil.Process().children(recursive=True) if p.pid in started and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
