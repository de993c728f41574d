"""`ftcluster bench suite=NAME`: load the suite, pick the hardware profile, run the cells, write the report."""

from __future__ import annotations

from pathlib import Path

from ftcluster.bench import hardware, report, runner
from ftcluster.bench.suite import load
from ftcluster.errors import UserError


def bench(suite_name: str, overrides: list[str], results_dir: str, work_dir: str | None, cluster_name: str | None,
          resume: bool = True) -> Path:
    suite = load(suite_name)
    cluster = hardware.cluster(cluster_name or suite.config.cluster)
    machine = hardware.machine_name()
    work = Path(work_dir) if work_dir else Path("runs") / "bench" / f"{suite.name}_{machine}"
    records = runner.run(suite, overrides, work.resolve(), cluster, resume=resume)
    path = report.write(records, suite, overrides, machine, cluster, Path(results_dir), work.resolve())
    measured = sum(r["status"] == "ok" for r in records)
    print(f"[ftcluster] bench {suite.name}: {measured} of {len(records)} cells measured")
    if not measured:
        reasons = "; ".join(f"{r['cell']}: {r['status']}: {r.get('reason', '')}" for r in records)
        raise UserError(f"no cell of suite {suite.name} could be measured ({reasons}); report in {path}")
    return path
