"""A suite's results as files: <stem>.jsonl (one record per cell, everything), <stem>.csv (the figures,
flat), <stem>.md (machine, versions, suite, the table with the planner's predictions beside the
measurements, skipped and failed cells, plots) and <stem>_throughput.png / <stem>_memory.png."""

from __future__ import annotations

import csv
import io
import itertools
import json
import platform
import time
from pathlib import Path

from ftcluster.util import atomic
from ftcluster.util.hardware import cpu_model

COLUMNS = [  # (key in a record, CSV/Markdown header, Markdown format)
    ("status", "status", "{}"),
    ("world_size", "world", "{}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("tokens_per_s_per_device", "tokens/s/device", "{:,.0f}"),
    ("samples_per_s", "samples/s", "{:,.2f}"),
    ("step_time_median_s", "step median (s)", "{:.3f}"),
    ("step_time_p90_s", "step p90 (s)", "{:.3f}"),
    ("tflops_per_device", "TFLOP/s/device", "{:.3g}"),
    ("mfu", "MFU", "{:.1%}"),
    ("comm_share", "comm share", "{:.1%}"),
    ("peak_memory_bytes", "peak mem (GiB)", "gib"),
    ("baseline_bytes", "of which baseline (GiB)", "gib"),
    ("predicted.peak_memory_bytes", "predicted mem (GiB)", "gib"),
    ("errors.peak_memory_bytes", "mem error", "{:+.1%}"),
    ("predicted.tokens_per_s", "predicted tokens/s", "{:,.0f}"),
    ("errors.tokens_per_s", "tokens/s error", "{:+.1%}"),
]


def stem(suite_name: str, hardware: str, date: str | None = None) -> str:
    return f"{suite_name}_{hardware}_{date or time.strftime('%Y-%m-%d')}"


def files(results_dir: Path, name: str) -> list[Path]:
    """Every file write() may put in results_dir for the report `name`, the records first (its sidecar,
    util/outputs.py, says they are bench's own)."""
    return [results_dir / f"{name}{suffix}" for suffix in (".jsonl", ".csv", ".md", "_throughput.png", "_memory.png")]


def write(records: list[dict], suite, overrides: list[str], hardware: str, cluster, results_dir: Path,
          work_dir: Path, name: str | None = None) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    name = name or stem(suite.name, hardware)
    atomic.write_text(results_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic.write_text(results_dir / f"{name}.csv", _csv(records, suite.axes))
    plots = _plots(records, suite.axes, results_dir, name)
    md = results_dir / f"{name}.md"
    atomic.write_text(md, _markdown(records, suite, overrides, hardware, cluster, work_dir, plots))
    return md


def value(record: dict, key: str):
    for part in key.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def _csv(records: list[dict], axes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["cell", *axes, *(key for key, _, _ in COLUMNS), "reason"])
    for r in records:
        writer.writerow([r["cell"], *(r["axes"].get(a) for a in axes), *(value(r, k) for k, _, _ in COLUMNS),
                         r.get("reason", "")])
    return buffer.getvalue()


def _fmt(v, spec: str) -> str:
    if v is None:
        return ""
    if spec == "gib":
        return f"{v / 2**30:.3f}"
    return spec.format(v)


def _markdown(records, suite, overrides, hardware, cluster, work_dir: Path, plots: list[Path]) -> str:
    manifest = _first_manifest(records, work_dir)
    lines = [f"# Benchmark suite `{suite.name}` on {hardware}, {time.strftime('%Y-%m-%d')}", ""]
    if suite.config.description:
        lines += [suite.config.description.strip(), ""]
    ok = [r for r in records if r["status"] == "ok"]
    lines += [f"{len(records)} cells: {len(ok)} measured, "
              f"{sum(r['status'] == 'skipped' for r in records)} skipped, "
              f"{sum(r['status'] in ('failed', 'oom') for r in records)} failed or out of memory. Each cell: "
              f"{suite.config.warmup_steps} warm-up steps, then {suite.config.measure_steps} measured steps, "
              f"through `ftcluster train`.", ""]
    lines += ["## Machine", "", f"- hardware profile: `{cluster.name}` ({_peaks(cluster)})",
              f"- host: {platform.node()}, {cpu_model()}"]
    if manifest:
        lines += [f"- hardware seen by the runs: `{json.dumps(manifest.get('hardware'))}`",
                  f"- python {manifest.get('python')}, git {manifest.get('git_sha')}",
                  "- packages: " + ", ".join(f"{k} {v}" for k, v in (manifest.get("packages") or {}).items() if v)]
    lines += ["", "## Results", "", _table(records, suite.axes), "",
              "Throughput sums work over time across the measured steps. MFU counts model FLOPs (6 per "
              "parameter per token plus attention, no recomputation) against the profile's peak. Peak memory: "
              "max over ranks of the device allocator's high-water mark (GPU) or of the resident set (CPU, with "
              "freed memory handed back to the OS at once: `trainer.exact_cpu_memory`). On CPU the prediction is "
              "the planner's tensor bytes plus the baseline, what the rank held after its first step besides its "
              "engine's tensors (interpreter, libraries, data), which the planner does not model. "
              "Predicted tokens/s: the tokens the cell's steps held over the predicted step time (the planner "
              "assumes full rows; `predicted.tokens_per_s_full_rows` in the JSONL is its own figure). "
              "Errors are (predicted - measured) / measured. Comm share: time rank 0 spent in collectives "
              "(DeepSpeed's communication logger, which blocks after each one) over step time.", ""]
    problems = [r for r in records if r["status"] != "ok"]
    if problems:
        lines += ["## Skipped and failed cells", ""]
        lines += [f"- `{r['cell']}`: **{r['status']}**: {r.get('reason', '')}" for r in problems]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## Suite", "", f"From `{suite.path.name}`" + (f", with `{' '.join(overrides)}`" if overrides else "")
              + ":", "", "```yaml", suite.path.read_text().strip(), "```", ""]
    config = _first_config(records, work_dir)
    if config:
        lines += ["## Full config of the first measured cell", "", "<details><summary>config.yaml</summary>", "",
                  "```yaml", config.strip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def _peaks(cluster) -> str:
    peaks = ", ".join(f"{dtype} {getattr(cluster.peak_tflops, dtype):.3g}" for dtype in ("fp32", "bf16", "fp16")
                      if getattr(cluster.peak_tflops, dtype))
    return f"peak TFLOP/s per device: {peaks}; efficiency assumed by the planner {cluster.efficiency:.0%}"


def _table(records: list[dict], axes: list[str]) -> str:
    columns = [c for c in COLUMNS if any(value(r, c[0]) is not None for r in records)]
    head = [*axes, *(h for _, h, _ in columns)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [str(r["axes"].get(a)) for a in axes] + [_fmt(value(r, k), spec) for k, _, spec in columns]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plots(records: list[dict], axes: list[str], results_dir: Path, name: str) -> list[Path]:
    """Throughput and memory against each swept axis, one line per combination of the other axes."""
    swept = [a for a in axes if len({json.dumps(r["axes"][a]) for r in records}) > 1]
    ok = [r for r in records if r["status"] == "ok"]
    if not swept or not ok:
        return []
    import matplotlib  # not at the top: choosing the Agg backend is process-wide, so only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, label, scale, suffix in (("tokens_per_s_per_device", "tokens/s per device", 1.0, "throughput"),
                                         ("peak_memory_bytes", "peak memory per rank (GiB)", 2.0**-30, "memory")):
        figure, panels = plt.subplots(1, len(swept), figsize=(5 * len(swept), 4), squeeze=False)
        for panel, axis in zip(panels[0], swept):
            xs = list(dict.fromkeys(str(r["axes"][axis]) for r in records))
            others = [a for a in axes if a != axis]
            key = lambda r: tuple(str(r["axes"][a]) for a in others)  # noqa: E731
            for group, members in itertools.groupby(sorted(ok, key=key), key=key):
                by_x = {str(r["axes"][axis]): r.get(metric) for r in members}
                ys = [by_x[x] * scale if by_x.get(x) is not None else float("nan") for x in xs]
                panel.plot(xs, ys, marker="o", label=", ".join(f"{a}={v}" for a, v in zip(others, group)) or None)
            panel.set_xlabel(axis)
            panel.set_ylabel(label)
            panel.grid(alpha=0.3)
            if others:
                panel.legend(fontsize=7)
        figure.tight_layout()
        path = results_dir / f"{name}_{suffix}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _first_manifest(records: list[dict], work_dir: Path) -> dict | None:
    for r in records:
        path = work_dir / "cells" / r["folder"] / "manifest.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _first_config(records: list[dict], work_dir: Path) -> str | None:
    for r in records:
        path = work_dir / "cells" / r["folder"] / "config.yaml"
        if r["status"] == "ok" and path.is_file():
            return path.read_text()
    return None
