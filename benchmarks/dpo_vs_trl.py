"""ftcluster DPO (reference cached, and live) vs TRL's DPOTrainer, on this machine's CPU, in one run.

    pip install -e '.[bench]'                      # TRL, for the other side
    python benchmarks/dpo_vs_trl.py                 # full measurement, report in benchmarks/results/
    python benchmarks/dpo_vs_trl.py --smoke         # a few steps end to end, report in the work folder

Every side trains the tiny model (ftcluster/assets/models/tiny) from the same weight file on the bundled
preference pairs (ftcluster/assets/data/json_extract/pairs_train.jsonl, 200 pairs in conversational form),
with the same batch (pairs per micro-batch and per optimizer step), sigmoid DPO loss (beta 0.1), optimizer
(torch's fused AdamW, same lr, constant schedule, no weight decay), gradient clipping 1.0, fp32, no gradient
checkpointing, one training process with 2 threads and the same number of steps, reading the pairs in the
same order (TRL's sampler is sequential over the order ftcluster's loader uses). The sides:

  ftcluster cached  stage.dpo.reference=cached: the reference log-probs come from a table computed once
                    (the first round computes it; its one-off time is reported apart), no reference model
                    during training.
  ftcluster live    stage.dpo.reference=live: a frozen reference copy scores every micro-batch.
  TRL               DPOTrainer with its defaults for the reference (a frozen copy, a forward per step).
  TRL precomputed   DPOTrainer(precompute_ref_log_probs=True): its own one-off reference pass, in memory.

Figures per side, over the steps after the first --warmup: pairs/s and step time (median, min, max) and the
training process's peak resident memory. The headline ratio is ftcluster cached over TRL (target >= 1.5x);
the runs alternate per round so that drift of a shared machine hits every side alike. ftcluster's step time
is its own (metrics.jsonl: loader + forward/backward/optimizer); TRL's is one whole iteration of its loop
(on_step_end to on_step_end). Writes benchmarks/results/dpo_vs_trl_cpu_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

from common import (REPO, add_logged_losses, add_run_arguments, busy_processes, drop_run_weights, environment, folders,
                    load1, run_logged, run_worker, start_worker, step_timer, wait_for_quiet)

TINY = REPO / "ftcluster" / "assets" / "models" / "tiny"
PAIRS = REPO / "ftcluster" / "assets" / "data" / "json_extract" / "pairs_train.jsonl"
PACKAGES = ["ftcluster", "torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "ray", "peft"]
SIDES = ("ftcluster-cached", "ftcluster-live", "trl", "trl-precomputed")
TARGET = 1.5


def ftcluster_run(a, work: Path, model_dir: Path, reference: str, tag: str) -> dict:
    out_dir = work / "runs" / tag
    overrides = [
        "stage=dpo", f"model.path={model_dir}", "model.init=pretrained", "data=json_extract_pairs", "data.eval_path=null",
        "peft=none", "strategy=zero0", "launcher.workers=1", f"launcher.cpus_per_worker={a.threads}",
        f"trainer.micro_batch_per_device={a.micro_batch}", f"trainer.global_batch={a.global_batch}",
        f"trainer.max_steps={a.warmup + a.steps}", "trainer.max_seq_len=256", "trainer.eval_every_steps=0",
        "trainer.save_every_steps=0", "trainer.eval_generate=false", f"optim.lr={a.lr}", "optim.scheduler=constant",
        "optim.warmup_steps=0", "tracking=none", "tracking.progress=false", f"stage.dpo.beta={a.beta}",
        "stage.dpo.sft_weight=0",
        f"stage.dpo.reference={reference}", f"stage.dpo.reference_cache_dir={work / 'reference_cache'}",
        f"seed={a.seed}", f"output_dir={out_dir}"]
    cmd = [sys.executable, "-m", "ftcluster.cli", "train", *overrides]
    print(f"[bench] {tag}: ftcluster train stage=dpo stage.dpo.reference={reference}", flush=True)
    info = run_logged(cmd, work / f"{tag}.log", a.threads, trainer_pattern=r"ray::Rank\b")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"step": r["step"], "time_s": r["samples_per_s"] and a.global_batch / r["samples_per_s"],
              "loss": r["loss"], "tokens": r["tokens_per_s"] * a.global_batch / r["samples_per_s"]}
             for r in sorted(rows, key=lambda r: r["step"]) if "samples_per_s" in r]
    pass_row = next((r for r in rows if "reference_pass_s" in r), {})
    return {"side": f"ftcluster-{reference}", "tag": tag, "command": " ".join(map(shlex.quote, cmd)), "steps": steps,
            "reference_pass_s": pass_row.get("reference_pass_s"), "cache_hit": pass_row.get("reference_cache_hit"),
            **info}


def trl_run(a, work: Path, model_dir: Path, order: list[int], precompute: bool, tag: str) -> dict:
    spec = {"model_dir": str(model_dir), "order": order, "output_dir": str(work / "runs" / tag), "threads": a.threads,
            "micro_batch": a.micro_batch, "accum": a.global_batch // a.micro_batch, "max_steps": a.warmup + a.steps,
            "lr": a.lr, "beta": a.beta, "seed": a.seed, "precompute": precompute}
    print(f"[bench] {tag}: trl DPOTrainer (precompute_ref_log_probs={precompute})", flush=True)
    return {"side": "trl-precomputed" if precompute else "trl",
            **run_worker(Path(__file__).resolve(), "--trl-worker", spec, work, tag, a.threads)}


# ----------------------------------------------------------------------------------------------------------
# The TRL side, in its own process (--trl-worker SPEC)

def trl_worker(spec_path: str) -> None:
    spec = start_worker(spec_path)
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    records = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    # Conversational form, rendered by the tokenizer's chat template as ftcluster renders it.
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in (records[i] for i in spec["order"])]
    dataset = datasets.Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=spec["output_dir"], max_steps=spec["max_steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["accum"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, optim="adamw_torch_fused", max_grad_norm=1.0, beta=spec["beta"],
        loss_type=["sigmoid"], precompute_ref_log_probs=spec["precompute"], max_length=256, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, seed=spec["seed"], logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, train_sampling_strategy="sequential",
        dataloader_pin_memory=False)
    steps: list[dict] = []
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[step_timer(steps)])
    setup_s = time.perf_counter() - started
    trainer.train()
    add_logged_losses(steps, trainer)
    Path(spec["result"]).write_text(json.dumps({"steps": steps, "setup_s": setup_s,
                                                "torch_threads": torch.get_num_threads()}))


# ----------------------------------------------------------------------------------------------------------
# Figures and the report

def figures(run: dict, warmup: int, pairs_per_step: int) -> dict:
    measured = [s for s in run["steps"] if s["step"] > warmup]
    times = [s["time_s"] for s in measured]
    return {"steps": len(measured), "median_step_s": statistics.median(times), "min_step_s": min(times),
            "max_step_s": max(times), "pairs_per_s": pairs_per_step / statistics.median(times),
            "peak_rss_mib": run.get("trainer_peak_rss_mib")}


def summarize(res: dict) -> None:
    a = res["settings"]
    for run in res["runs"]:
        run["figures"] = figures(run, a["warmup"], a["global_batch"])
    by_side = {side: [r for r in res["runs"] if r["side"] == side] for side in SIDES}
    rounds = len(by_side["trl"])

    def ratio(num: str, den: str) -> dict:
        per_round = [by_side[num][i]["figures"]["pairs_per_s"] / by_side[den][i]["figures"]["pairs_per_s"]
                     for i in range(rounds)]
        return {"ratio": math.exp(statistics.fmean(math.log(x) for x in per_round)), "rounds": per_round}

    res["ratios"] = {"ftcluster-cached / trl": ratio("ftcluster-cached", "trl"),
                     "ftcluster-live / trl": ratio("ftcluster-live", "trl"),
                     "ftcluster-cached / ftcluster-live": ratio("ftcluster-cached", "ftcluster-live"),
                     "ftcluster-cached / trl-precomputed": ratio("ftcluster-cached", "trl-precomputed")}
    headline = res["ratios"]["ftcluster-cached / trl"]
    headline["target"] = TARGET
    headline["met"] = all(x >= TARGET for x in headline["rounds"])
    first = {side: runs[0] for side, runs in by_side.items()}
    res["loss_agreement"] = {side: _max_diff(first["ftcluster-cached"], first[side]) for side in SIDES[1:]}


def _max_diff(a: dict, b: dict) -> float:
    other = {s["step"]: s["loss"] for s in b["steps"] if s.get("loss") is not None}
    return max(abs(s["loss"] - other[s["step"]]) for s in a["steps"] if s["step"] in other)


def write_report(res: dict, path: Path) -> None:
    a, env = res["settings"], res["environment"]
    L = [f"# DPO: ftcluster vs TRL's DPOTrainer on CPU ({res['date']})\n",
         f"{env['cpu_model']}, {env['cores']} cores, {env['platform']}; "
         + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; git {env['git']['sha']}"
         + (f" ({env['git']['dirty_files']} files uncommitted)" if env["git"]["dirty_files"] else "") + ".\n",
         f"Machine {'quiet' if res['quiet']['quiet'] else 'NOT quiet'} at the start (1-min load "
         f"{res['quiet']['load1']:.2f}).{' SMOKE RUN: too few steps to mean anything.' if res['smoke'] else ''}\n",
         f"Tiny model (2 layers, hidden 64), 200 bundled pairs, {a['micro_batch']} pairs per micro-batch, "
         f"{a['global_batch']} per step, sigmoid DPO beta {a['beta']} (no RPO term), fused AdamW lr {a['lr']} "
         f"constant, fp32, "
         f"{a['threads']} threads, {a['warmup']} warm-up + {a['steps']} measured steps, {a['rounds']} rounds.\n",
         "## Result\n",
         "| ratio of pairs/s | geometric mean | per round |", "|---|---|---|"]
    for name, r in res["ratios"].items():
        target = f" (target >= {r['target']}x: {'met' if r['met'] else 'NOT met'})" if "target" in r else ""
        L.append(f"| {name} | **{r['ratio']:.2f}x**{target} | " + ", ".join(f"{x:.2f}x" for x in r["rounds"]) + " |")
    L += ["", "| run | pairs/s | step median (min-max) | peak RSS of the training process | one-off reference pass |",
          "|---|---|---|---|---|"]
    for run in res["runs"]:
        f = run["figures"]
        ref = f"{run['reference_pass_s']:.1f} s" if run.get("reference_pass_s") and not run.get("cache_hit") else (
            "read from the cache" if run.get("cache_hit") else "")
        rss = f"{f['peak_rss_mib']:.0f} MiB" if f["peak_rss_mib"] else "not measured"
        L.append(f"| {run['tag']} | {f['pairs_per_s']:.1f} | {f['median_step_s'] * 1000:.0f} ms "
                 f"({f['min_step_s'] * 1000:.0f}-{f['max_step_s'] * 1000:.0f}) | {rss} | {ref} |")
    L += ["", "Largest per-step loss difference from the first ftcluster-cached run (same weights, pairs and order; "
          "TRL also trains the newline after the end-of-turn token): "
          + ", ".join(f"{side} {d:.2g}" for side, d in res["loss_agreement"].items()) + ".\n",
          "## Commands\n"]
    for side in SIDES:
        run = next(r for r in res["runs"] if r["side"] == side)
        L.append(f"- {side}: `{run['command']}`")
    L += ["", f"Reproduce: `{res['reproduce']}`", *[f"\nNote: {n}" for n in res["notes"]]]
    path.write_text("\n".join(L) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="3 measured steps after 1 warm-up, 1 round")
    p.add_argument("--beta", type=float, default=0.1)
    add_run_arguments(p, steps=40)
    a = p.parse_args()
    if a.trl_worker:
        trl_worker(a.trl_worker)
        return 0
    if a.smoke:
        a.steps, a.warmup, a.rounds = 3, 1, 1
    work, out = folders(a, "ftcluster-dpo-bench-")

    import pyarrow as pa

    from ftcluster.data.loader import GlobalBatchLoader
    from ftcluster.data.rows import PreparedRows
    from ftcluster.train.random_init import materialize_random_init

    model_dir = Path(materialize_random_init(str(TINY), work / "init_model", a.seed))
    # The order ftcluster's loader reads the 200 pairs in (one row per pair, file order, seeded epochs).
    index = PreparedRows(pa.table({"input_ids": [[i] for i in range(200)]}), "the 200 pairs' order")
    loader = GlobalBatchLoader(index, a.global_batch, a.micro_batch, 0, 1, a.seed, True, 0, False)
    order = [i for step in range(a.warmup + a.steps) for i in loader.global_rows(step)]

    quiet = {"quiet": None, "load1": load1(), "busy": busy_processes()}
    if a.wait_quiet > 0:
        quiet = wait_for_quiet(a.wait_quiet, a.quiet_load)
    started_at, runs = time.strftime("%Y-%m-%dT%H:%M:%S%z"), []
    for r in range(1, a.rounds + 1):
        runs.append(ftcluster_run(a, work, model_dir, "cached", f"r{r}-ftcluster-cached"))
        runs.append(trl_run(a, work, model_dir, order, False, f"r{r}-trl"))
        runs.append(ftcluster_run(a, work, model_dir, "live", f"r{r}-ftcluster-live"))
        runs.append(trl_run(a, work, model_dir, order, True, f"r{r}-trl-precomputed"))
    date = time.strftime("%Y-%m-%d")
    res = {"date": date, "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "smoke": a.smoke, "settings": {k: v for k, v in vars(a).items() if k not in ("trl_worker", "workdir", "out")},
           "environment": environment(PACKAGES),
           "quiet": quiet, "workdir": str(work), "notes": list(a.note), "runs": runs,
           "reproduce": "python benchmarks/dpo_vs_trl.py" + (" --smoke" if a.smoke else "")}
    summarize(res)
    stem = f"dpo_vs_trl_cpu_{date}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out / f"{stem}.md")
    for name, r in res["ratios"].items():
        print(f"[bench] {name}: {r['ratio']:.2f}x", flush=True)
    print(f"[bench] wrote {out / (stem + '.md')}", flush=True)
    drop_run_weights(a, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
