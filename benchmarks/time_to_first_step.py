"""Time to first step: from the start of `ftcluster train` (the CLI launched as a subprocess) to the first row
with a loss in its metrics.jsonl, for launcher=local, processes and inline with 1 and 2 workers on the tiny
model (issue 23, point 1: at most 10 s for 2 workers under launcher=local, at most 5 s under processes), the
issue's own command, and a first run whose data is prepared on every run (`fresh:2`).

Two code trees side by side in one run, alternating run by run: `before` (a revision, default HEAD, unpacked
with `git archive` into a temporary folder and put first on PYTHONPATH) and `after` (this working tree). Each
cell is the median of --repeats runs; one unmeasured warm-up per tree first (bytecode, the prepared-data cache).

Breakdown, for both trees from the same source: every line the command prints is stamped when it arrives,
and the first line of each milestone below gives that phase's end.

    python benchmarks/time_to_first_step.py                 # every cell, 3 runs each, report in benchmarks/results
    python benchmarks/time_to_first_step.py --repeats 1 --cells local:2 --no-before   # one quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import REPO, RESULTS, Monitor, environment, wait_for_quiet  # noqa: E402
from helpers import TINY  # noqa: E402

CELLS = ["local:2", "local:1", "processes:2", "processes:1", "inline:1"]
# A first run: launcher=local, its data (FRESH_RECORDS multi-turn chats, fewer than the 16 units of 512 records
# that would go to Ray Data) prepared in the driver on every run, into a store of its own.
FRESH_CELL = "fresh:2"
FRESH_RECORDS = 7600
# The issue's own command (its defaults: evaluation and generation before the first step), as one more cell.
ISSUE_CELL = "issue:2"
# The first printed line matching each pattern ends that phase (in order; a phase a tree does not print is
# left out).
MILESTONES = [
    ("data ready", "[ftcluster] data train:"),
    ("workers joined", " workers: "),
    ("first loss row", None),  # from metrics.jsonl, not the log
]


def unpack(rev: str, into: Path) -> Path:
    """The package as it was at `rev` (git archive: reads the repository, changes nothing in it)."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", rev, "ftcluster", "conf"], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    # The config tree as ftcluster.conf inside the package: the editable install maps that name to this
    # checkout's conf/, which the package path must win over, or `before` composes with today's YAML.
    shutil.copytree(into / "conf", into / "ftcluster" / "conf")
    return into


def overrides(cell: str, out: Path) -> list[str]:
    launcher, workers = cell.split(":")
    if launcher == "fresh":
        return [*TINY, "launcher=local", f"launcher.workers={workers}", "trainer.max_steps=2", "data=custom",
                f"data.path={out.parent / 'fresh_chats.jsonl'}", "data.format=chat", "data.eval_path=null",
                "trainer.max_seq_len=1024", f"data.prepared_dir={out / 'prepared'}", f"output_dir={out}"]
    if launcher == "issue":
        # max_steps 4: its 3 warm-up steps must fit
        return ["model=tiny", "peft=none", f"launcher.workers={workers}", "trainer.max_steps=4",
                "trainer.eval_every_steps=0", f"output_dir={out}"]
    return [*TINY, f"launcher={launcher}", f"launcher.workers={workers}", "trainer.max_steps=2", f"output_dir={out}"]


def first_loss_row(metrics: Path) -> bool:
    if not metrics.is_file():
        return False
    for line in metrics.read_text().split("\n"):
        try:
            if "loss" in json.loads(line):
                return True
        except json.JSONDecodeError:
            continue
    return False


def run_once(cell: str, tree: Path | None, work: Path, tag: str) -> dict:
    """One `ftcluster train`: its time to the first loss row and its milestones."""
    out = work / f"{tag}-{cell.replace(':', '-')}-{time.strftime('%H%M%S')}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    if tree is not None:
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "ftcluster.cli", "train", *overrides(cell, out)]
    lines: list[tuple[float, str]] = []
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in proc.stdout), daemon=True)
    reader.start()
    monitor = Monitor(proc.pid)  # its process tree, Ray's processes included, to wait for below
    first = None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and first is None:
        if first_loss_row(metrics):
            first = time.time() - started
            break
        time.sleep(0.02)
    code = proc.wait(timeout=600)
    total = time.time() - started
    reader.join(timeout=10)
    if first is None and first_loss_row(metrics):  # written in the last 20 ms before exit
        first = total
    (out.parent / f"{out.name}.log").write_text("".join(f"{t - started:8.2f} {line}" for t, line in lines))
    milestones = {}
    for name, pattern in MILESTONES:
        hit = next((t - started for t, line in lines if pattern and pattern in line), None)
        if hit is not None:
            milestones[name] = round(hit, 2)
    monitor.finish(linger_s=30)  # the next run starts on a machine the last one has left
    time.sleep(1.0)
    return {"cell": cell, "tree": tag, "first_s": None if first is None else round(first, 2), "total_s": round(total, 2),
            "code": code, "milestones": milestones, "out": str(out),
            "tail": "".join(line for _, line in lines[-8:]) if code else ""}


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def report(results: list[dict], env: dict, quiet: dict, args) -> str:
    trees = [t for t in ("before", "after") if any(r["tree"] == t for r in results)]
    cells = list(dict.fromkeys(r["cell"] for r in results))
    targets = {"local:2": 10.0, "issue:2": 10.0, "processes:2": 5.0}
    rows = ["| launcher:workers | " + " | ".join(f"{t} (s, median; runs)" for t in trees)
            + (" | after/before" if len(trees) == 2 else "") + " | target |",
            "|---" * (len(trees) + 2 + (len(trees) == 2)) + "|"]
    for cell in cells:
        cols, meds = [], {}
        for tree in trees:
            runs = [r for r in results if r["cell"] == cell and r["tree"] == tree]
            meds[tree] = median([r["first_s"] for r in runs])
            failed = sum(1 for r in runs if r["code"] != 0)
            cols.append(f"**{meds[tree]}** ({', '.join(str(r['first_s']) for r in runs)})"
                        + (f" {failed} failed" if failed else ""))
        ratio = (f" | {meds['after'] / meds['before']:.2f}x" if len(trees) == 2 and meds.get("before") and meds.get("after")
                 else (" | " if len(trees) == 2 else ""))
        target = targets.get(cell)
        met = "" if target is None or meds.get("after", meds.get(trees[-1])) is None else (
            " met" if meds.get(trees[-1]) <= target else " NOT met")
        rows.append(f"| {cell} | " + " | ".join(cols) + ratio + f" | {f'<= {target:g} s{met}' if target else ''} |")
    lines = [f"# Time to first step, CPU, {time.strftime('%Y-%m-%d')}", "",
             "From the start of `ftcluster train` (the CLI launched as a subprocess) to the first row with a loss in "
             "its metrics.jsonl. `python benchmarks/time_to_first_step.py "
             + " ".join(sys.argv[1:]) + "`.", "",
             f"Machine: {env['cpu_model']}, {env['cores']} cores; {env['platform']}; git {env['git']['sha']} "
             f"({env['git']['dirty_files']} files changed in the working tree). Quiet before the run: {quiet}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             (f"Trees: `before` = `git archive {args.before}` on PYTHONPATH; `after` = the working tree. Runs "
              f"alternate before/after, cell by cell; " if len(trees) == 2 else "Tree: the working tree only (`after`); ")
             + f"{args.repeats} runs a cell, median shown with every run.", "",
             "Overrides: tests/helpers.py TINY (the tiny model, bundled json_extract data, no evaluation) + "
             "`launcher=L launcher.workers=N trainer.max_steps=2`; `issue:2` is the issue's command as given "
             "(`model=tiny peft=none launcher.workers=2`, its defaults: evaluation with generation before step 1) "
             "with trainer.max_steps=4 trainer.eval_every_steps=0; `fresh:2` is a first run under launcher=local: "
             f"{FRESH_RECORDS} synthetic multi-turn chats (benchmarks/data_prepare.py's), prepared in the driver on "
             "every run into a store of its own (trainer.max_seq_len=1024).", "", *rows, ""]
    lines += ["## Breakdown (medians, seconds from the command's start)", "",
              "Milestones from the command's own output, stamped on arrival (both trees):", ""]
    names = [n for n, _ in MILESTONES]
    lines += ["| cell | tree | " + " | ".join(names) + " |", "|---|---" + "|---" * len(names) + "|"]
    for cell in cells:
        for tree in trees:
            runs = [r for r in results if r["cell"] == cell and r["tree"] == tree]
            vals = [median([r["milestones"].get(n) if n != "first loss row" else r["first_s"] for r in runs])
                    for n in names]
            lines.append(f"| {cell} | {tree} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |")
    failures = [r for r in results if r["code"] != 0]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {r['cell']} {r['tree']} exit {r['code']}: ```{r['tail']}```"
                                              for r in failures]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", default=",".join([*CELLS, ISSUE_CELL, FRESH_CELL]), help="launcher:workers,...")
    parser.add_argument("--before", default="HEAD", help="the revision measured as `before`")
    parser.add_argument("--no-before", action="store_true", help="measure the working tree only")
    parser.add_argument("--out", default=str(RESULTS / f"time_to_first_step_cpu_{time.strftime('%Y-%m-%d')}.md"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--wait-quiet", type=float, default=600)
    parser.add_argument("--no-warmup", action="store_true", help="the trees ran here before (--workdir)")
    args = parser.parse_args()
    quiet = wait_for_quiet(args.wait_quiet, 0.5)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ttfs-"))
    work.mkdir(parents=True, exist_ok=True)
    trees: dict[str, Path | None] = {"after": None}
    if not args.no_before:
        trees = {"before": unpack(args.before, work / "before-tree"), "after": None}
    cells = args.cells.split(",")
    if FRESH_CELL in cells:
        from data_prepare import write_chats

        write_chats(work / "fresh_chats.jsonl", FRESH_RECORDS)
    for tag, tree in ({} if args.no_warmup else trees).items():  # bytecode, the prepared data, Ray's first start
        warm = run_once("local:2", tree, work, f"warmup-{tag}")
        print(f"[bench] warm-up {tag}: {warm['first_s']} s (exit {warm['code']})", flush=True)
    results = []
    for repeat in range(args.repeats):
        for cell in cells:
            for tag, tree in trees.items():
                result = run_once(cell, tree, work, tag)
                results.append(result)
                print(f"[bench] {repeat + 1}/{args.repeats} {cell} {tag}: first loss row {result['first_s']} s, "
                      f"exit {result['code']}, {result['milestones']}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results, environment(["torch", "deepspeed", "ray", "transformers"]), quiet, args)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    print(f"[bench] report: {args.out}; runs in {work}")


if __name__ == "__main__":
    main()
