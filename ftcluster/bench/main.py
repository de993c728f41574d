"""`ftcluster bench suite=NAME`: load the suite, pick the hardware profile, claim the work and results folders,
run the cells, write the report.

Both folders are checked before the first cell runs (util/outputs.py), so hours of cells never end in a refusal:
--work must be new, empty or an earlier bench's work folder (its marker says so; resume continues it), and is
locked for the run (run/lock.py) so that a second bench into it is refused naming the first; in --results, a
folder many reports share, only the report's own files are claimed: new, or this command's earlier report
(its sidecar) with --overwrite.
"""

from __future__ import annotations

from pathlib import Path

from ftcluster.bench import hardware, report, runner
from ftcluster.bench.suite import load
from ftcluster.errors import UserError
from ftcluster.run import lock as run_lock
from ftcluster.util.outputs import claim_files, claim_folder, mark_files, mark_folder

COMMAND = "ftcluster bench"
# Everything bench writes in its work folder.
WORK_NAMES = (runner.CELLS_FILE, runner.CELLS_DIR, run_lock.LOCK_FILE)


def bench(suite_name: str, overrides: list[str], results_dir: str, work_dir: str | None, cluster_name: str | None,
          resume: bool = True, overwrite: bool = False) -> Path:
    suite = load(suite_name)
    cluster = hardware.cluster(cluster_name or suite.config.cluster)
    machine = hardware.machine_name()
    work = (Path(work_dir) if work_dir else Path("runs") / "bench" / f"{suite.name}_{machine}").resolve()
    results = Path(results_dir).resolve()
    name = report.stem(suite.name, machine)
    outputs = report.files(results, name)
    if work == results or work in results.parents or results in work.parents:
        raise UserError(f"--work {work} and --results {results} overlap; give each a folder of its own")
    claim_files(outputs, COMMAND, option="--results", overwrite=overwrite)
    # An earlier bench's work folder passes (overwrite=True): resume decides which of its cells run again.
    claim_folder(work, COMMAND, option="--work", overwrite=True)
    run_lock.acquire(work)
    try:
        mark_folder(work, COMMAND, WORK_NAMES)
        records = runner.run(suite, overrides, work, cluster, resume=resume)
        path = report.write(records, suite, overrides, machine, cluster, results, work, name)
        mark_files(outputs, COMMAND)
    finally:
        run_lock.release(work)
    measured = sum(r["status"] == "ok" for r in records)
    print(f"[ftcluster] bench {suite.name}: {measured} of {len(records)} cells measured")
    if not measured:
        reasons = "; ".join(f"{r['cell']}: {r['status']}: {r.get('reason', '')}" for r in records)
        raise UserError(f"no cell of suite {suite.name} could be measured ({reasons}); report in {path}")
    return path
