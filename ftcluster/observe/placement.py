"""Where every rank runs (output_dir/workers.json, written at start by observe/watchdog.py) and the names of the
files and settings the hang diagnosis uses: what a launcher reads to name a rank, without importing torch."""

from __future__ import annotations

import json
from pathlib import Path

PLACEMENT_FILE = "workers.json"
HANG_REPORT = "hang-rank-{}.txt"
# Where the launcher tells workers to write hang reports (the run's output_dir).
REPORT_DIR_ENV = "FTCLUSTER_RUN_DIR"


def nccl_timeout_s(collective_timeout_s: int) -> int:
    """NCCL's process-group timeout: later than ftcluster's stall diagnosis (collective_timeout_s) by enough for
    it to read every rank's heartbeat and write its report."""
    return collective_timeout_s + max(60, collective_timeout_s // 10)


def read_placement(output_dir: str) -> dict[int, dict]:
    path = Path(output_dir) / PLACEMENT_FILE
    if not path.is_file():
        return {}
    return {entry["rank"]: entry for entry in json.loads(path.read_text())}


def describe_rank(entry: dict | None, rank: int) -> str:
    if not entry:
        return f"rank {rank}"
    return f"rank {rank} (node {entry['node']}, {entry['ip']}, pid {entry['pid']})"


def summary(placement: list[dict]) -> str:
    """`node1: ranks 0-1, node2: ranks 2-3`: contiguous ranks per node."""
    by_node: dict[str, list[int]] = {}
    for entry in placement:
        by_node.setdefault(entry["node"], []).append(entry["rank"])
    return ", ".join(f"{node}: rank{'s' if len(r) > 1 else ''} {_span(r)}" for node, r in by_node.items())


def _span(ranks: list[int]) -> str:
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 1:
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))
