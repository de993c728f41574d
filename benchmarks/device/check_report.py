"""One line per gpu_checks.sh check: PASS or FAIL, with the run's MFU and peak memory.

MFU: the logged tokens_per_s (steps after the first, which carries compilation and warm-up) times the model's
training FLOPs per token (ftcluster.bench.hardware.flops_per_token, what `ftcluster bench` uses) over the
detected device's peak for the run's precision. Peak memory: the largest per-rank figure of the run's
peak_memory.json (ftcluster.observe.peak_memory), device memory on a GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _mfu(run: Path) -> str:
    try:
        from ftcluster.bench.hardware import cluster, detected_profile, flops_per_token
        from ftcluster.config import load_run_config

        cfg = load_run_config(run / "config.yaml")
        rates = [r["tokens_per_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if "tokens_per_s" in r]
        rate = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]
        peak = cluster(detected_profile()).peak_flops(cfg.strategy.precision)
        return f"{rate * flops_per_token(cfg) / peak:.1%}"
    except Exception as exc:  # a failed run has no metrics; say why instead of failing the report
        return f"n/a ({type(exc).__name__})"


def _peak_memory(run: Path) -> str:
    path = run / "peak_memory.json"
    if not path.is_file():
        return "n/a"
    sizes = [value for rank in json.loads(path.read_text()) for key, value in rank.items()
             if "bytes" in key and "peak" in key and isinstance(value, (int, float))]
    return f"{max(sizes) / 2**30:.2f} GiB" if sizes else "n/a"


def main(name: str, status: str, run: str) -> None:
    verdict = "PASS" if status == "0" else "SKIP" if status == "skip" else f"FAIL (exit {status})"
    folder = Path(run)
    extra = "" if not folder.is_dir() else f"  MFU {_mfu(folder)}  peak memory {_peak_memory(folder)}"
    print(f"{name:<8} {verdict}{extra}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
