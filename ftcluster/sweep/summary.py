"""The sweep's results, computed from the trial folders alone (so both backends, and a sweep continued after an
interruption, give the same summary): sweep.csv sorted by the metric, sweep_<param>.png per swept parameter, and
best.yaml, the best trial's resolved config ready for `ftcluster train --config best.yaml`.

A trial's metric is its value at the trial's last evaluation. The best trial is the best completed one (a
trial stopped early was judged worse than others at the same step); with none completed, the best of all.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftcluster.config import SweepConfig
from ftcluster.sweep.space import Param
from ftcluster.sweep.trial import TRIALS_DIR, metric_rows, read_record
from ftcluster.util.atomic import replacing, write_text
from ftcluster.util.secrets import without_secrets

CSV_FILE = "sweep.csv"
BEST_FILE = "best.yaml"


def summarize(sweep_dir: Path, cfg: DictConfig, space: list[Param]) -> list[dict]:
    """Writes sweep.csv, the plots and best.yaml; returns the rows, best first."""
    rows = sort_rows(collect(sweep_dir, cfg), cfg.sweep.metric, cfg.sweep.mode)
    write_csv(sweep_dir / CSV_FILE, rows, cfg.sweep.metric, [p.key for p in space])
    for param in space:
        plot(sweep_dir / f"sweep_{param.key}.png", rows, param, cfg.sweep.metric)
    best = best_row(rows)
    if best is not None:
        write_best(sweep_dir / BEST_FILE, sweep_dir, best, cfg.sweep.metric)
    return rows


def collect(sweep_dir: Path, cfg: DictConfig) -> list[dict]:
    metric, rows = cfg.sweep.metric, []
    root = sweep_dir / TRIALS_DIR
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        record = read_record(folder)
        if not record:
            continue
        evaluations = metric_rows(folder, metric)
        last = evaluations[-1] if evaluations else {}
        value = last.get(metric)
        rows.append({"trial": folder.name, "params": record.get("params", {}),
                     "metric": float(value) if value is not None else None, "step": last.get("step"),
                     "status": status(folder, record, cfg.trainer.max_steps), "output_dir": str(folder)})
    return rows


def status(folder: Path, record: dict, max_steps: int) -> str:
    if record.get("status") == "completed" or (folder / "final" / "config.json").is_file():
        return "completed"
    if record.get("status") == "stopped":
        return f"stopped early at step {record['step']}"
    if record.get("status") == "failed":
        return f"failed: {record.get('error', '')}"
    # not at the top: it imports torch, which a sweep needs here for unfinished trials only
    from ftcluster.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(folder)
    return f"interrupted at step {newest.name.split('-')[-1]}" if newest else "not started"


def sort_rows(rows: list[dict], metric: str, mode: str) -> list[dict]:
    def key(row):
        value = row["metric"]
        if value is None or math.isnan(value):
            return (1, 0.0)
        return (0, value if mode == "min" else -value)

    return sorted(rows, key=key)


def best_row(rows: list[dict]) -> dict | None:
    measured = [r for r in rows if r["metric"] is not None and not math.isnan(r["metric"])]
    completed = [r for r in measured if r["status"] == "completed"]
    return (completed or measured or [None])[0]


def write_csv(path: Path, rows: list[dict], metric: str, keys: list[str]) -> None:
    lines = [["trial", *keys, metric, "step", "status", "output_dir"]]
    for r in rows:
        lines.append([r["trial"], *(_cell(r["params"].get(k)) for k in keys), "" if r["metric"] is None else
                      repr(r["metric"]), "" if r["step"] is None else r["step"], r["status"], r["output_dir"]])
    with replacing(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows(lines)


def _cell(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else "" if value is None else str(value)


def plot(path: Path, rows: list[dict], param: Param, metric: str) -> None:
    """The metric at each trial's last evaluation against the parameter: filled for completed trials, hollow
    for those stopped early (their value is from an earlier step)."""
    import matplotlib  # not at the top: choosing the Agg backend is process-wide, so only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["metric"] is not None and math.isfinite(r["metric"]) and param.key in r["params"]]
    values = [r["params"][param.key] for r in measured]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    labels = [] if numeric else sorted({_cell(v) for v in values})
    fig, ax = plt.subplots(figsize=(6, 4))
    for done, style in ((True, {"color": "C0"}), (False, {"facecolors": "none", "edgecolors": "C1"})):
        chosen = [(v, r) for v, r in zip(values, measured) if (r["status"] == "completed") == done]
        if chosen:
            xs = [v if numeric else labels.index(_cell(v)) for v, _ in chosen]
            ax.scatter(xs, [r["metric"] for _, r in chosen], label="completed" if done else "stopped early / other",
                       **style)
    if param.kind == "loguniform":
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(param.key)
    ax.set_ylabel(f"{metric} (last evaluation)")
    ax.set_title(f"{metric} against {param.key}, {len(measured)} trials")
    if measured:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_best(path: Path, sweep_dir: Path, best: dict, metric: str) -> None:
    """The best trial's resolved config.yaml, made a new run: its own output_dir, resume=never, no sweep.
    Secrets (masked as *** in the trial's config.yaml) are left out and named in the header: a *** kept would
    be run as the token itself."""
    cfg = OmegaConf.load(Path(best["output_dir"]) / "config.yaml")
    cfg.output_dir = str(sweep_dir / "best")
    cfg.resume = "never"
    cfg.sweep = asdict(SweepConfig())
    cfg.tracking.wandb.name = None
    values, left_out = without_secrets(OmegaConf.to_container(cfg))
    header = (f"# The best trial of the sweep in {sweep_dir}: {best['trial']}, {metric}={best['metric']:.6g} at step "
              f"{best['step']} ({best['status']}), with {json.dumps(best['params'])}.\n"
              f"# Train it again, e.g. longer or on more data: ftcluster train --config {path} [key=value ...]\n")
    write_text(path, header + secrets_note(left_out) + OmegaConf.to_yaml(OmegaConf.create(values)))


def secrets_note(left_out: list[str]) -> str:
    if not left_out:
        return ""
    return (f"# Left out because they held secrets (never written to a file): {', '.join(left_out)}. Supply each "
            f"again when you train this:\n# an environment variable in the environment (export NAME=...; the "
            f"launchers hand it to the job), any other key as an override (KEY=VALUE, or +KEY=VALUE for a key of "
            f"your own).\n")
