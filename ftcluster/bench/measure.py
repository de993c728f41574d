"""What one finished cell measured, from the files its run wrote (metrics.jsonl, peak_memory.json).

Only the steps after the warm-up count. Throughput is work over time summed across the measured steps
(not a mean of per-step rates, which would over-weight fast steps). FLOP/s are model FLOPs (no
recomputation counted, so MFU does not rise when gradient checkpointing makes a step slower).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ftcluster.observe.peak_memory import PEAK_FILE
from ftcluster.observe.track import read_metrics


def measure(output_dir: Path, warmup_steps: int, world_size: int, flops_per_token: float | None,
            peak_flops_per_device: float | None) -> dict:
    rows = [r for r in read_metrics(output_dir) if "step_time_s" in r and r["step"] > warmup_steps]
    if not rows:
        raise RuntimeError(f"{output_dir}/metrics.jsonl has no step past the {warmup_steps} warm-up steps")
    times = [r["step_time_s"] for r in rows]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    samples = sum(r["samples_per_s"] * r["step_time_s"] for r in rows)
    elapsed = sum(times)
    tokens_per_s = tokens / elapsed
    out = {
        "steps_measured": len(rows),
        "tokens_per_s": tokens_per_s,
        "tokens_per_step": tokens / len(rows),
        "tokens_per_s_per_device": tokens_per_s / world_size,
        "samples_per_s": samples / elapsed,
        "step_time_median_s": statistics.median(times),
        "step_time_p90_s": percentile(times, 90),
    }
    if flops_per_token:
        out["tflops_per_device"] = flops_per_token * out["tokens_per_s_per_device"] / 1e12
        if peak_flops_per_device:
            out["peak_flops_per_device"] = peak_flops_per_device
            out["mfu"] = out["tflops_per_device"] * 1e12 / peak_flops_per_device
    if all("comm_time_s" in r for r in rows):
        out["comm_share"] = sum(r["comm_time_s"] for r in rows) / elapsed
    out.update(_peak_memory(output_dir))
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy's import for a list."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _peak_memory(output_dir: Path) -> dict:
    path = Path(output_dir) / PEAK_FILE
    if not path.is_file():
        return {}
    ranks = json.loads(path.read_text())
    out = {"peak_memory_bytes": max(r["peak_bytes"] for r in ranks),
           "peak_memory_bytes_per_rank": [r["peak_bytes"] for r in ranks]}
    if all("reserved_bytes" in r for r in ranks):
        out["reserved_memory_bytes"] = max(r["reserved_bytes"] for r in ranks)
    if all("baseline_bytes" in r for r in ranks):
        out["baseline_bytes"] = max(r["baseline_bytes"] for r in ranks)
    return out
