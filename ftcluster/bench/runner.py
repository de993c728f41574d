"""Runs a suite's cells, one after another, each through the same path as `ftcluster train`.

Every cell's config is composed before the first cell starts, so a typo in the suite fails at once. A cell
the hardware cannot run (what validate() refuses: too many workers, flash-attn missing...) is recorded as
skipped with the reason; a cell that runs out of memory or fails is recorded as such; either way the suite
goes on. Each record is appended to <work_dir>/cells.jsonl as soon as its cell ends: a suite started again
skips the cells recorded there under the same settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tqdm import tqdm

from ftcluster.bench.hardware import flops_per_token, for_cell, prediction
from ftcluster.bench.measure import measure
from ftcluster.bench.suite import Cell, Suite
from ftcluster.config import compose, validate
from ftcluster.errors import UserError
from ftcluster.run.driver import train

CELLS_FILE = "cells.jsonl"
CELLS_DIR = "cells"  # one run folder per cell
# A cell keeps its logs and metrics; its weights (checkpoint, final/) are only what a training run leaves.
DROPPED_AFTER_MEASURING = ("checkpoints", "final", "init_model", "data")


def run(suite: Suite, overrides: list[str], work_dir: Path, cluster, resume: bool = True) -> list[dict]:
    cells = suite.cells()
    args = {cell.name: _cell_args(suite, cell, overrides, work_dir) for cell in cells}
    configs = {name: compose(a) for name, a in args.items()}  # a suite typo fails here, before any run
    settings = _fingerprint(suite, overrides)
    work_dir.mkdir(parents=True, exist_ok=True)
    done = _recorded(work_dir, settings) if resume else {}
    records = []
    with tqdm(total=len(cells), desc=f"bench {suite.name}", unit="cell", dynamic_ncols=True) as bar:
        for cell in cells:
            if cell.name in done:
                records.append(done[cell.name])
            else:
                bar.set_postfix_str(cell.name)
                record = run_cell(suite, cell, args[cell.name], configs[cell.name], work_dir, cluster)
                record["settings"] = settings
                with open(work_dir / CELLS_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
                records.append(record)
            bar.update(1)
    return records


def run_cell(suite: Suite, cell: Cell, args: list[str], cfg, work_dir: Path, cluster) -> dict:
    record = {"cell": cell.name, "folder": cell.folder, "axes": {k: v for k, v in cell.axes},
              "overrides": cell.overrides}
    try:
        derived = validate(cfg)
    except UserError as exc:
        return {**record, "status": "skipped", "reason": str(exc)}
    record["world_size"] = derived.world_size
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # an earlier attempt of this cell, cut short
    try:
        profile = for_cell(cluster, cfg)
        record["predicted"] = prediction(cfg, profile)
        train(cfg, ["bench", *args])
    except UserError as exc:
        return {**record, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # recorded, and the suite goes on: one cell's failure is a result too
        return {**record, "status": "oom" if _out_of_memory(exc) else "failed", "reason": _first_line(exc)}
    record.update(status="ok", **measure(out, suite.config.warmup_steps, derived.world_size,
                                          flops_per_token(cfg), profile.peak_flops(cfg.strategy.precision)))
    # The planner assumes full rows; a cell's rows are as full as packing made them (SmolLM2's bundled data:
    # 75%), so its throughput is predicted for the tokens its steps really held.
    predicted = record["predicted"]
    predicted["tokens_per_s_full_rows"] = predicted["tokens_per_s"]
    predicted["tokens_per_s"] = record["tokens_per_step"] / predicted["step_time_s"]
    if "baseline_bytes" in record:  # CPU: the planner counts tensors; the process itself is measured
        predicted["tensor_bytes"] = predicted["peak_memory_bytes"]
        predicted["peak_memory_bytes"] += record["baseline_bytes"]
    record["errors"] = _prediction_errors(record)
    for name in DROPPED_AFTER_MEASURING:
        shutil.rmtree(out / name, ignore_errors=True)
    return record


def _cell_args(suite: Suite, cell: Cell, overrides: list[str], work_dir: Path) -> list[str]:
    c = suite.config
    fixed = [f"trainer.max_steps={c.warmup_steps + c.measure_steps}", "trainer.log_every_steps=1",
             "trainer.eval_every_steps=0", "trainer.eval_generate=false", "trainer.save_every_steps=0",
             "trainer.stop_after_steps=null", f"trainer.profile_comms={str(c.profile_comms).lower()}",
             "trainer.exact_cpu_memory=true",
             "tracking.progress=false", "resume=never", f"output_dir={work_dir / CELLS_DIR / cell.folder}"]
    return [*c.base, *overrides, *cell.overrides, *fixed]


def _prediction_errors(record: dict) -> dict:
    """Relative error of the planner against the measurement: (predicted - measured) / measured."""
    predicted, errors = record.get("predicted") or {}, {}
    for name, measured in (("peak_memory_bytes", record.get("peak_memory_bytes")),
                           ("tokens_per_s", record.get("tokens_per_s"))):
        if predicted.get(name) and measured:
            errors[name] = (predicted[name] - measured) / measured
    return errors


def _fingerprint(suite: Suite, overrides: list[str]) -> str:
    c = suite.config
    text = json.dumps([c.warmup_steps, c.measure_steps, c.profile_comms, c.base, c.cluster, overrides])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _recorded(work_dir: Path, settings: str) -> dict:
    path = work_dir / CELLS_FILE
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()] if path.is_file() else []
    return {r["cell"]: r for r in rows if r.get("settings") == settings}


def _out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "out of memory" in text or "outofmemoryerror" in text


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]
