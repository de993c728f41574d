"""`ftcluster bench compare A B`: two suites' results side by side, cell by cell, as ratios B / A.

Cells are matched by name (their overrides), so two runs of one suite on two machines, or before and after
a change, line up; cells only one side has are listed apart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ftcluster.errors import UserError

FIGURES = [("tokens_per_s", "tokens/s"), ("mfu", "MFU"), ("peak_memory_bytes", "peak mem"),
           ("step_time_median_s", "step median")]


def load_results(path: str) -> list[dict]:
    """A suite's .jsonl, or its .md report (the .jsonl beside it)."""
    p = Path(path)
    if p.suffix == ".md":
        p = p.with_suffix(".jsonl")
    if not p.is_file():
        raise UserError(f"{path}: no such result file; give a suite's .jsonl or .md from benchmarks/results/")
    records = []
    for line, text in enumerate(p.read_text(encoding="utf-8").split("\n"), 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{p}:{line}: not a JSON line ({exc.msg}); is it a bench result file?") from None
        if not isinstance(record, dict) or "cell" not in record or "status" not in record:
            raise UserError(f"{p}:{line}: not a bench cell record (no 'cell' and 'status')")
        records.append(record)
    return records


def compare(a_path: str, b_path: str) -> str:
    a = {r["cell"]: r for r in load_results(a_path)}
    b = {r["cell"]: r for r in load_results(b_path)}
    both = [name for name in a if name in b]
    head = ["cell"] + [f"{label} {side}" for _, label in FIGURES for side in ("A", "B", "B/A")]
    lines = [f"A: {a_path}", f"B: {b_path}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: dict[str, list[float]] = {key: [] for key, _ in FIGURES}
    for name in both:
        row = [name]
        for key, _ in FIGURES:
            left, right = _figure(a[name], key), _figure(b[name], key)
            ratio = right / left if left and right is not None else None
            if ratio:
                ratios[key].append(ratio)
            row += [_show(key, left), _show(key, right), f"{ratio:.3f}" if ratio is not None else ""]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for key, label in FIGURES:
        if ratios[key]:
            geomean = math.exp(sum(math.log(x) for x in ratios[key]) / len(ratios[key]))
            lines.append(f"{label} B/A, geometric mean over {len(ratios[key])} cells: {geomean:.3f}")
    for side, mine, other in (("A", a, b), ("B", b, a)):
        alone = [name for name in mine if name not in other]
        if alone:
            lines.append(f"only in {side}: " + ", ".join(alone))
    return "\n".join(lines)


def _figure(record: dict, key: str):
    return record.get(key) if record.get("status") == "ok" else None


def _show(key: str, v) -> str:
    if v is None:
        return "-"
    if key == "peak_memory_bytes":
        return f"{v / 2**30:.3f} GiB"
    if key == "mfu":
        return f"{v:.1%}"
    return f"{v:,.3g}" if v < 100 else f"{v:,.0f}"
