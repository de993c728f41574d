"""ftcluster SFT vs a plain Hugging Face `transformers.Trainer` and TRL's `SFTTrainer`, on this machine's CPU,
in one run.

    pip install -e '.[bench]'                          # TRL, for the third side
    python benchmarks/sft_baselines.py                 # full measurement, report in benchmarks/results/
    python benchmarks/sft_baselines.py --smoke         # a few steps end to end, report in the work folder
    python benchmarks/sft_baselines.py --launcher processes   # ftcluster's ranks without Ray: what Ray costs
    python benchmarks/sft_baselines.py --model smollm2  # SmolLM2-135M against the Trainer alone (~12 min)

ftcluster runs with launcher=local (its default: a Ray cluster on this machine, one Ray rank actor) unless
--launcher processes (a plain spawned process, no Ray); the report and its file name say which.

Every side trains the tiny model (ftcluster/assets/models/tiny; with --model smollm2 the pretrained
SmolLM2-135M-Instruct, where the per-step overhead matters less) from the very same weight file, on the same
seeded variable-length chat data set (built here, written once as JSONL), tokenized the same way, with the
same batch (rows per micro-batch, rows per optimizer step), optimizer (torch's fused AdamW, the Trainer's
default, same lr, betas, eps, no weight decay, constant schedule, no warm-up), gradient clipping (1.0), precision
(fp32), no gradient checkpointing, one training process with 2 threads and the same number of steps. Only the
batching policy and the training loop differ. Four comparisons:

  1. ftcluster with packing (data.packing=true, its default) vs the Trainer padding each micro-batch to its
     longest example (DataCollatorForSeq2Seq(padding=True), labels -100 on padding).
  2. ftcluster without packing (data.packing=false: each micro-batch padded to its longest row) vs the same
     Trainer run: an equal padding policy.
  3. ftcluster with packing vs SFTTrainer with its packing (packing=True, packing_strategy="bfd": best-fit
     decreasing into rows of max_length, which TRL always runs padding-free: each micro-batch's rows back to
     back in one sequence, position_ids restarting per example, no attention_mask).
  4. ftcluster without packing vs SFTTrainer without packing (its collator pads each micro-batch to its longest
     row): an equal padding policy.

Tokenization is identical by construction: the Trainer and the SFTTrainer are given the rows that
ftcluster.data.prepare wrote with data.packing=false (input_ids, and labels that are -100 outside assistant
turns), which TRL takes as a pre-tokenized data set and uses as is (it packs them for comparison 3). TRL's
own route, a conversational data set with assistant_only_loss=True, refuses this model's chat template
(ChatML without {% generation %} markers, which TRL cannot patch for an unknown template); and a template
edited to have them would also train the newline after <|im_end|>, which ftcluster leaves out. Tokenizing
happens before training on every side, outside the timed steps. In comparisons 2 and 4 the baselines read
the rows in the order ftcluster's loader does (train_sampling_strategy="sequential" over that order), so all
three sides see the very same micro-batches and their per-step losses must agree, which the report checks.
With packing the rows differ by construction (each side packs its own way); TRL's packed rows are drawn by
its default seeded random sampler, as ftcluster's loader shuffles its own.

Measured per optimizer step, after the first --warmup steps (start-up excluded: model load, Ray start, TRL's
data preparation):
  effective tokens/s = real (non-padding) tokens of the step / step time, and
  packing efficiency  = real tokens / (rows x padded width), summed over the measured micro-batches, and
  against the Trainer, the ratio at equal speed per FLOP = the Trainer's matmul FLOPs per real token / ftcluster's
  (step_flops): the limit of the data and batching when both sides' kernels run equally fast.
ftcluster's figures come from its own output_dir/metrics.jsonl (`tokens_per_s`: real tokens over the time of
loader + forward/backward/optimizer, see ftcluster/stages/sft.py); the padded widths are recomputed with
ftcluster's loader over the rows it prepared. A baseline's step time is one whole iteration of its loop
(on_step_end to on_step_end: fetching and collating the step's micro-batches, forward/backward, clipping,
optimizer, its per-step logging), its token counts come from the batches it trained on.

Each round runs SFTTrainer packed, ftcluster packed, Trainer, SFTTrainer unpacked, ftcluster unpacked,
Trainer: every ftcluster run sits between the two runs it is compared with, so that drift of a shared
machine hits all sides alike. Writes benchmarks/results/sft_baselines_cpu_<date>.{md,json} (the reports
before TRL joined are sft_vs_hf_trainer_cpu_<date>.md, from this script under its old name).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from common import (REPO, add_logged_losses, add_run_arguments, busy_processes, drop_run_weights, environment, folders,
                    load1, run_logged, run_worker, start_worker, step_timer, wait_for_quiet)

TINY = REPO / "ftcluster" / "assets" / "models" / "tiny"
# --model: what it trains, and the defaults that keep a run affordable on a 2-core CPU. SmolLM2 takes 100-250
# real tokens/s in fp32 there: shorter examples and rows, a few long steps (with 3 per run rounds came out
# 0.2-0.4x apart, with 6 0.03x), a learning rate for a pretrained model, and the Trainer alone (the issue's
# targets are against it; TRL's runs would double the time).
MODELS = {
    "tiny": {"title": "tiny model", "defaults": {}},
    "smollm2": {"title": "SmolLM2-135M-Instruct (pretrained)",
                "defaults": {"records": 300, "max_len": 240, "max_seq_len": 256, "steps": 6, "warmup": 1,
                             "lr": 1e-5, "baselines": "trainer"}},
}
PACKAGES = ["ftcluster", "torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "ray",
            "hydra-core", "tokenizers", "numpy"]

# A plain English word pool the tiny tokenizer was trained on (its GENERIC sentences), so lengths in tokens
# track lengths in words and the text looks like text.
WORDS = ("the quick brown fox jumps over lazy dog what is capital of france paris please answer question in "
         "one short sentence write poem about sea and sky hello how can help you today thank very much that "
         "was really helpful weather sunny with light breeze from west she opened window listened to rain on "
         "roof numbers like appear many texts explain difference between list dictionary python model trained "
         "for twenty steps loss went down good correct easy read they walked market buy bread cheese apples "
         "summarise following paragraph your own words review positive or negative loved film translate "
         "french green tea train leaves at nine morning could tell me more history city").split()
SYSTEM = "You answer."


# ----------------------------------------------------------------------------------------------------------
# The data set

def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words)), str(rng.randint(1, 2024)))
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def _text(rng: random.Random, n_sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(max(1, n_sentences)))


def build_dataset(path: Path, n: int, lo: int, hi: int, max_seq_len: int, seed: int, tokenizer) -> list[int]:
    """n single-turn chats whose token counts follow a log-uniform law on [lo, hi] (seeded); returns them.

    Real instruction data is right-skewed (many short answers, a tail of long ones); a log-uniform law over
    a 15-30x range is a simple stand-in. Each record gets a target length, a user/assistant split, and
    sentences are added, then the assistant's text is cut word by word to the largest length <= target.
    """
    from ftcluster.data.template import encode_chat

    rng = random.Random(seed)
    lengths = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            target = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            user_share = rng.uniform(0.15, 0.6)
            # ~1.45 tokens per word with this tokenizer; sentences average ~9 words; framing ~26 tokens.
            budget_words = max(2, (target - 26) / 1.45)
            user = _text(rng, int(round(budget_words * user_share / 9)) or 1)
            user_words = user.split()
            user = " ".join(user_words[:max(1, int(budget_words * user_share))])
            answer_words = _text(rng, int(budget_words / 9) + 3).split()

            def length(k: int) -> int:
                msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                        {"role": "assistant", "content": " ".join(answer_words[:k])}]
                return len(encode_chat(msgs, tokenizer)[0])

            # Largest k with length(k) <= target (at least one word); length grows with k.
            good, bad = 1, len(answer_words) + 1
            if length(len(answer_words)) <= target:
                good = len(answer_words)
            else:
                while bad - good > 1:
                    mid = (good + bad) // 2
                    good, bad = (mid, bad) if length(mid) <= target else (good, mid)
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                        {"role": "assistant", "content": " ".join(answer_words[:good])}]
            n_tokens = length(good)
            if n_tokens > max_seq_len:  # never happens with hi <= max_seq_len; nothing is truncated
                raise RuntimeError(f"record of {n_tokens} tokens > max_seq_len {max_seq_len}")
            lengths.append(n_tokens)
            f.write(json.dumps({"messages": messages}) + "\n")
    return lengths


def _distribution(values: list[int]) -> dict:
    s = sorted(values)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"count": len(s), "min": s[0], "p10": q(0.10), "p25": q(0.25), "median": statistics.median(s),
            "p75": q(0.75), "p90": q(0.90), "max": s[-1], "mean": round(statistics.fmean(s), 1), "sum": sum(s)}


def ftcluster_overrides(a, data_path: Path, model_dir: Path, packing: bool, output_dir: Path) -> list[str]:
    return [f"model={a.model}", f"model.path={model_dir}", "model.init=pretrained", "model.attn_implementation=sdpa",
            "data=custom", f"data.path={data_path}", "data.format=chat", f"data.packing={str(packing).lower()}",
            "peft=none", "strategy=zero0", "strategy.precision=fp32", "strategy.gradient_clipping=1.0",
            f"launcher={a.launcher}", "launcher.workers=1", f"launcher.cpus_per_worker={a.threads}", "tracking=none",
            "trainer.eval_generate=false", f"trainer.max_seq_len={a.max_seq_len}",
            f"trainer.micro_batch_per_device={a.micro_batch}", f"trainer.global_batch={a.global_batch}",
            f"trainer.max_steps={a.warmup + a.steps}", "trainer.log_every_steps=1", "trainer.eval_every_steps=0",
            "trainer.save_every_steps=0", f"optim.lr={a.lr}", "optim.weight_decay=0.0", "optim.scheduler=constant",
            "optim.warmup_steps=0", f"seed={a.seed}", f"output_dir={output_dir}"]


# The command line of the process that trains, per launcher: the Ray rank actor, or the spawned rank.
TRAINING_PROCESS = {"local": r"ray::Rank\b", "processes": r"multiprocessing\.spawn import spawn_main"}
LAUNCHERS = {"local": "launcher=local: a Ray cluster on this machine, one Ray rank actor",
             "processes": "launcher=processes: one spawned process, no Ray"}


def ftcluster_cli() -> list[str]:
    exe = Path(sys.executable).with_name("ftcluster")
    return [str(exe)] if exe.is_file() else ["ftcluster"]


def batch_shapes(rows_dir: Path, a, packed: bool, pad_id: int, steps: int) -> list[dict]:
    """Per step, what ftcluster's loader hands the model: real tokens, padded tokens, examples, label tokens."""
    from ftcluster.data.loader import GlobalBatchLoader
    from ftcluster.data.rows import read_rows

    loader = GlobalBatchLoader(read_rows(rows_dir), a.global_batch, a.micro_batch, 0, 1, a.seed,
                               True, pad_id, packed)
    out = []
    for step in range(steps):
        mbs = loader.micro_batches(step)
        out.append({"real": sum(int(mb["num_tokens"]) for mb in mbs),
                    "processed": sum(mb["input_ids"].numel() for mb in mbs),
                    "rows": sum(mb["input_ids"].shape[0] for mb in mbs),
                    "examples": sum(int(mb["num_examples"]) for mb in mbs),
                    "label_tokens": sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in mbs)})
    return out


def run_ftcluster(a, work: Path, data_path: Path, model_dir: Path, packing: bool, tag: str) -> dict:
    out_dir = work / "runs" / tag
    overrides = ftcluster_overrides(a, data_path, model_dir, packing, out_dir)
    cmd = [*ftcluster_cli(), "train", *overrides]
    print(f"[bench] {tag}: ftcluster train (data.packing={str(packing).lower()})", flush=True)
    info = run_logged(cmd, work / f"{tag}.log", a.threads, trainer_pattern=TRAINING_PROCESS[a.launcher])
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = sorted((m for m in metrics if "tokens_per_s" in m), key=lambda m: m["step"])
    total = a.warmup + a.steps
    if [m["step"] for m in train_rows] != list(range(1, total + 1)):
        raise RuntimeError(f"{out_dir}/metrics.jsonl has steps {[m['step'] for m in train_rows]}, expected 1..{total}")
    stats = json.loads((out_dir / "data" / "stats.json").read_text())
    shapes = batch_shapes(out_dir / "data" / "train", a, packing, stats["pad_id"], total)
    steps = []
    for m, s in zip(train_rows, shapes):
        # tokens_per_s / samples_per_s = tokens / examples of the step: checks that the recomputed batches are
        # the ones the run trained on.
        if abs(m["tokens_per_s"] / m["samples_per_s"] - s["real"] / s["examples"]) > 1e-6 * s["real"]:
            raise RuntimeError(f"step {m['step']}: metrics.jsonl disagrees with the recomputed batch {s}")
        steps.append({"step": m["step"], "time_s": s["real"] / m["tokens_per_s"], "tokens_per_s": m["tokens_per_s"],
                      "loss": m["loss"], **s})
    return {"side": "ftcluster", "packing": packing, "tag": tag, "command": " ".join(map(shlex.quote, cmd)),
            "data_stats": stats, "steps": steps, **info}


BASELINES = {"trainer": "transformers.Trainer (pad to longest)", "trl": "trl.SFTTrainer"}


def run_baseline(a, work: Path, model_dir: Path, rows_dir: Path, side: str, packing: bool, order: list[int] | None,
                 tag: str) -> dict:
    """One Hugging Face side (`side` in BASELINES) in its own process, on the unpacked rows ftcluster prepared:
    in `order` when given (the order ftcluster's loader reads them), else all of them, shuffled by the side."""
    spec = {"side": side, "packing": packing, "model_dir": str(model_dir), "rows_dir": str(rows_dir), "order": order,
            "output_dir": str(work / "runs" / tag), "threads": a.threads, "micro_batch": a.micro_batch,
            "accum": a.global_batch // a.micro_batch, "max_steps": a.warmup + a.steps, "lr": a.lr, "seed": a.seed,
            "max_seq_len": a.max_seq_len}
    print(f"[bench] {tag}: {BASELINES[side]}" + (" packing=True" if packing else ""), flush=True)
    return {"side": side, "packing": packing,
            **run_worker(Path(__file__).resolve(), "--hf-worker", spec, work, tag, a.threads)}


# ----------------------------------------------------------------------------------------------------------
# The Hugging Face sides, each in its own process (--hf-worker SPEC)

def hf_worker(spec_path: str) -> None:
    """Train one baseline as its spec says and write its per-step figures, losses and settings to spec["result"]."""
    spec = start_worker(spec_path)
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The rows ftcluster.data.prepare wrote with data.packing=false: one tokenized example per row, labels -100
    # outside assistant turns. The baselines get input_ids and labels (and the Trainer an attention_mask).
    rows = datasets.load_from_disk(spec["rows_dir"])
    if spec["order"] is not None:
        rows = rows.select(spec["order"])
    rows = rows.remove_columns(["example_lengths", "num_examples"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False  # as ftcluster does; no KV cache is built in training forwards
    shared = dict(
        output_dir=spec["output_dir"], max_steps=spec["max_steps"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["accum"], learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        optim="adamw_torch_fused", max_grad_norm=1.0, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, seed=spec["seed"], dataloader_pin_memory=False,
        disable_tqdm=True, bf16=False, fp16=False, gradient_checkpointing=False,
        # Given an order, read it as is; otherwise the Trainer's default seeded random order.
        train_sampling_strategy="sequential" if spec["order"] is not None else "random")
    counts = {"real": 0, "processed": 0, "examples": 0, "label_tokens": 0}
    steps: list[dict] = []
    build = {"trainer": _trainer, "trl": _sft_trainer}[spec["side"]]
    started = time.perf_counter()
    trainer, shown = build(spec, model, tokenizer, rows, shared, counts, [step_timer(steps, counts)])
    setup_s = time.perf_counter() - started
    trainer.train()
    add_logged_losses(steps, trainer)
    for s in steps:
        s["tokens_per_s"] = s["real"] / s["time_s"]
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    Path(spec["result"]).write_text(json.dumps({
        "steps": steps, "torch_threads": torch.get_num_threads(), "setup_s": setup_s,
        "arguments": {k: v for k, v in trainer.args.to_dict().items() if k in ARGS_SHOWN}, **shown,
        # What the side trains on after its own preparation (TRL packs here): rows and how full they are.
        "prepared": {"rows": len(lengths), "tokens": sum(lengths),
                     "fill": sum(lengths) / (len(lengths) * spec["max_seq_len"])},
    }))


def _counting(trainer_cls, counts: dict):
    """`trainer_cls`, counting what each micro-batch holds; training itself is the class's own training_step."""

    class Counting(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            if "attention_mask" in inputs:  # padded rows, one example each
                counts["real"] += int(inputs["attention_mask"].sum())
                counts["examples"] += ids.shape[0]
            else:  # TRL padding-free: the micro-batch's examples back to back in one row, no padding at all
                counts["real"] += ids.numel()
                counts["examples"] += inputs["cu_seq_lens_q"].numel() - 1
            counts["processed"] += ids.numel()
            counts["label_tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    return Counting


def _trainer(spec, model, tokenizer, rows, shared, counts, callbacks):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    rows = rows.map(lambda r: {"attention_mask": [1] * len(r["input_ids"])})
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = _counting(Trainer, counts)(model=model, args=TrainingArguments(**shared), train_dataset=rows,
                                         data_collator=collator, callbacks=callbacks)
    return trainer, {"collator": "DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)"}


def _sft_trainer(spec, model, tokenizer, rows, shared, counts, callbacks):
    from trl import SFTConfig, SFTTrainer

    # `shared` turns off SFTConfig's defaults that would make the sides differ: bf16 and gradient checkpointing.
    # TRL's loss (its fused LM head, which never builds the full logits, plus the entropy and token accuracy
    # it logs) is its default and stays.
    args = SFTConfig(**shared, max_length=spec["max_seq_len"], packing=spec["packing"], packing_strategy="bfd")
    trainer = _counting(SFTTrainer, counts)(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                                            callbacks=callbacks)
    collator = trainer.data_collator
    return trainer, {"collator": f"{type(collator).__name__}(pad_token_id={collator.pad_token_id}, "
                                 f"padding_free={collator.padding_free}) (SFTTrainer's default)"}


ARGS_SHOWN = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
              "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim",
              "max_grad_norm", "logging_steps", "save_strategy", "eval_strategy", "report_to", "use_cpu", "seed",
              "train_sampling_strategy", "bf16", "fp16", "gradient_checkpointing", "dataloader_num_workers",
              "max_length", "packing", "packing_strategy", "padding_free", "assistant_only_loss",
              "completion_only_loss", "loss_type")


# ----------------------------------------------------------------------------------------------------------
# Figures

def _measured(run: dict, warmup: int) -> list[dict]:
    return [s for s in run["steps"] if s["step"] > warmup]


def figures(run: dict, warmup: int) -> dict:
    measured = _measured(run, warmup)
    rates = [s["tokens_per_s"] for s in measured]
    real, processed = sum(s["real"] for s in measured), sum(s["processed"] for s in measured)
    out = {"steps": len(measured), "median_tokens_per_s": statistics.median(rates), "min_tokens_per_s": min(rates),
           "max_tokens_per_s": max(rates), "aggregate_tokens_per_s": real / sum(s["time_s"] for s in measured),
           "median_step_s": statistics.median(s["time_s"] for s in measured), "real_tokens": real,
           "processed_tokens": processed, "packing_efficiency": real / processed,
           "real_tokens_per_step": real / len(measured), "padded_tokens_per_step": processed / len(measured),
           "examples_per_step": sum(s["examples"] for s in measured) / len(measured)}
    if all("core_time_s" in s for s in measured):
        out["median_core_tokens_per_s"] = statistics.median(s["real"] / s["core_time_s"] for s in measured)
    return out


def matmul_weights(model_dir: Path) -> dict:
    """Per token, the weights its matmuls go through: all decoder layers', and the output layer's."""
    from ftcluster.plan.flops import layer_matmul_weights
    from ftcluster.plan.shape import read_shape

    shape = read_shape(str(model_dir))
    return {"layers": shape.layers * layer_matmul_weights(shape), "head": shape.vocab * shape.hidden}


def step_flops(step: dict, weights: dict, side: str) -> int:
    """The training matmul FLOPs of one step of full fine-tuning: 6 per weight per token (forward, activation and
    weight gradients: ftcluster.plan.flops' convention), attention's own matmuls left out. The decoder layers run
    on every position of the micro-batches, padding included; the output layer on the positions whose logits the
    side computes: ftcluster's the labelled ones only (ftcluster.objectives.chunked), the Trainer's every one."""
    head_positions = step["label_tokens"] if side == "ftcluster" else step["processed"]
    return 6 * (weights["layers"] * step["processed"] + weights["head"] * head_positions)


def work_figures(run: dict, warmup: int, weights: dict) -> dict:
    """The measured steps' matmul FLOPs per real token, and the matmul FLOP/s the run reached."""
    measured = _measured(run, warmup)
    flops = sum(step_flops(s, weights, run["side"]) for s in measured)
    return {"flops_per_real_token": flops / sum(s["real"] for s in measured),
            "matmul_gflops_per_s": flops / sum(s["time_s"] for s in measured) / 1e9}


def loss_agreement(ft: dict, hf: dict) -> dict:
    pairs = [(a["loss"], b["loss"]) for a, b in zip(ft["steps"], hf["steps"]) if b.get("loss") is not None]
    diffs = [abs(x - y) for x, y in pairs]
    return {"steps_compared": len(pairs), "max_abs_diff": max(diffs) if diffs else None,
            "first": pairs[0] if pairs else None, "last": pairs[-1] if pairs else None}


COMPARISONS = (
    # key, ftcluster run, the baseline run beside it, the baseline's name, target (None: none set), title
    ("packed_vs_trainer", "ftcluster-packed", "trainer-a", "Trainer", 2.0,
     "1. ftcluster packing vs Trainer pad-to-longest"),
    ("unpacked_vs_trainer", "ftcluster-unpacked", "trainer-b", "Trainer", 0.95,
     "2. ftcluster no packing vs Trainer (equal padding)"),
    ("packed_vs_trl", "ftcluster-packed", "trl-packed", "SFTTrainer", None,
     "3. ftcluster packing vs SFTTrainer packing (BFD, padding-free)"),
    ("unpacked_vs_trl", "ftcluster-unpacked", "trl-unpacked", "SFTTrainer", None,
     "4. ftcluster no packing vs SFTTrainer no packing (equal padding)"),
)
# A round's runs in order: each ftcluster run between the two baselines it is compared with.
ROUND_NAMES = {"trl-packed": "SFTTrainer packed", "ftcluster-packed": "ftcluster packed", "trainer-a": "Trainer",
               "trl-unpacked": "SFTTrainer unpacked", "ftcluster-unpacked": "ftcluster unpacked",
               "trainer-b": "Trainer"}


def round_order(with_trl: bool) -> list[str]:
    return [name for name in ROUND_NAMES if with_trl or not name.startswith("trl-")]


# The baselines that read ftcluster's unpacked micro-batches, so their losses must match its own step by step.
SAME_BATCHES = {"trainer-b": "Trainer", "trl-unpacked": "SFTTrainer"}


def summarize(res: dict) -> None:
    """Figures per run, and per comparison the ratio of each ftcluster run to the baseline run beside it.

    The headline ratio of a comparison is the geometric mean of its per-round ratios: each ratio is taken
    between two runs minutes apart, so a load that changes between rounds cancels out, which pooling the
    steps of all rounds would not do.
    """
    warmup = res["settings"]["warmup"]
    runs = {r["tag"]: r for r in res["runs"]}
    weights = res.get("matmul_weights")
    for r in res["runs"]:
        r["figures"] = figures(r, warmup)
        if weights and r["side"] in ("ftcluster", "trainer"):
            r["figures"].update(work_figures(r, warmup, weights))
    comparisons = {}
    for key, ft_name, base_name, base_label, target, title in COMPARISONS:
        if f"r1-{base_name}" not in runs:  # a baseline this measurement left out (--baselines)
            continue
        rounds = []
        for n in range(1, res["settings"]["rounds"] + 1):
            ft, base = runs[f"r{n}-{ft_name}"]["figures"], runs[f"r{n}-{base_name}"]["figures"]
            rounds.append({"round": n, "ftcluster": ft, "baseline": base,
                           "ratio": ft["median_tokens_per_s"] / base["median_tokens_per_s"],
                           "ratio_aggregate": ft["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"],
                           "ratio_baseline_core_time": ft["median_tokens_per_s"] / base["median_core_tokens_per_s"]})
            if "flops_per_real_token" in ft and "flops_per_real_token" in base:
                # What the ratio would be if both sides ran their matmuls at the same FLOP/s: the limit of
                # this data and batching, which only faster kernels on one side can pass.
                rounds[-1]["ratio_at_equal_flops"] = base["flops_per_real_token"] / ft["flops_per_real_token"]
        ratio = math.exp(statistics.fmean(math.log(x["ratio"]) for x in rounds))
        comparisons[key] = {"title": title, "baseline": base_label, "target": target, "ratio": ratio,
                            "ratio_min": min(x["ratio"] for x in rounds), "ratio_max": max(x["ratio"] for x in rounds),
                            "rounds": rounds}
        if all("ratio_at_equal_flops" in x for x in rounds):
            comparisons[key]["ratio_at_equal_flops"] = math.exp(statistics.fmean(
                math.log(x["ratio_at_equal_flops"]) for x in rounds))
        if target is not None:
            meeting = sum(x["ratio"] >= target for x in rounds)
            # Met only when every round meets it; rounds on both sides of the target leave it open.
            comparisons[key].update(rounds_meeting_target=meeting, verdict="yes" if meeting == len(rounds) else
                                    "no" if meeting == 0 else "inconclusive")
    res["comparisons"] = comparisons
    res["loss_agreement"] = {name: loss_agreement(runs["r1-ftcluster-unpacked"], runs[f"r1-{name}"])
                             for name in SAME_BATCHES if f"r1-{name}" in runs}


def _f(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _rate(f: dict) -> str:
    return f"{_f(f['median_tokens_per_s'])} ({_f(f['min_tokens_per_s'])}-{_f(f['max_tokens_per_s'])})"


def _target(c: dict) -> tuple[str, str]:
    if c["target"] is None:
        return "none set", "-"
    verdict = "yes" if c["verdict"] == "yes" else c["verdict"].upper()
    return f">= {c['target']}x", f"{verdict} ({c['rounds_meeting_target']} of {len(c['rounds'])} rounds)"


def write_report(res: dict, md_path: Path) -> None:
    a, w = res["settings"], res["settings"]["warmup"]
    comps = res["comparisons"]
    ds, env, q = res["dataset"], res["environment"], res["quiet"]
    runs = {r["tag"]: r for r in res["runs"]}
    L = []
    launcher = a.get("launcher", "local")  # reports measured before --launcher existed ran launcher=local
    model = a.get("model", "tiny")  # and before --model, the tiny model
    with_trl = "r1-trl-packed" in runs
    title = ("" if model == "tiny" else f", {MODELS[model]['title']}") + (
        "" if launcher == "local" else f", launcher={launcher}")
    sides = "Hugging Face Trainer and TRL SFTTrainer" if with_trl else "the Hugging Face Trainer"
    L.append(f"# ftcluster SFT vs {sides} on CPU ({res['date']}{title})\n")
    if res.get("smoke"):
        L.append("**Smoke configuration: too few steps for the figures to mean anything.**\n")
    if q["quiet"] is False:
        L.append(f"**Measured on a busy machine.** Other jobs ran throughout (1-minute load average "
                 f"{min(r['load1_during'].get('min', 0) for r in res['runs']):.1f} to "
                 f"{max(r['load1_during'].get('max', 0) for r in res['runs']):.1f} on {env['cores']} cores while the "
                 f"runs went, see Machine); the script waited {q['waited_s']} s for a quiet machine first. Absolute "
                 f"figures are not representative; the ratios compare runs taken minutes apart, but contention still "
                 f"weighs on them (ftcluster's launcher processes compete for the same cores). Re-run on a quiet machine.\n")
    L.append(f"ftcluster ran with {LAUNCHERS[launcher]}. Same {MODELS[model]['title']} and initial weights, same data, "
             f"tokenization and batch; one training process with {a['threads']} threads each. Effective tokens/s = "
             f"real (non-padding) tokens per second of training step time, median over {a['steps']} steps after {w} "
             "warm-up steps (start-up excluded); min and max beside it. "
             "Packing efficiency = real tokens / (rows x padded width) over the same steps. Each ftcluster run is "
             "compared with the baseline runs right before and after it; the ratio of a comparison is the geometric "
             "mean of its rounds' ratios, and a target counts as met only when every round meets it (inconclusive "
             "when the rounds fall on both sides). The issue sets targets against the Trainer only.\n")
    L.append("## Results\n")
    L.append("| comparison | ratio (ftcluster / baseline) | per round | target | met | packing efficiency ftcluster / "
             "baseline |")
    L.append("|---|---|---|---|---|---|")
    for c in comps.values():
        r0 = c["rounds"][0]
        target, met = _target(c)
        L.append(f"| {c['title']} | **{c['ratio']:.2f}x** | " + ", ".join(f"{x['ratio']:.2f}x" for x in c["rounds"])
                 + f" | {target} | {met} | {r0['ftcluster']['packing_efficiency']:.1%} / "
                 f"{r0['baseline']['packing_efficiency']:.1%} |")
    L.append("")
    equal = [c for c in comps.values() if "ratio_at_equal_flops" in c]
    if equal:
        L.append("At equal speed per FLOP (both sides' matmuls at the same FLOP/s) these batches would give: "
                 + "; ".join(f"comparison {c['title'][:1]} {c['ratio_at_equal_flops']:.2f}x" for c in equal)
                 + ". That is the limit of the data and the batching: the real tokens per matmul FLOP of each side "
                 "(6 FLOPs per weight per token; the decoder layers on every position, padding included; the output "
                 "layer on the labelled positions for ftcluster, on every position for the Trainer; attention left "
                 "out). A measured ratio above it means ftcluster's kernels ran faster per FLOP; the per-run matmul "
                 "GFLOP/s are below.\n")
    L.append("Effective tokens/s per run, median (min-max) over the measured steps:\n")
    L.append("| comparison | round | ftcluster | baseline | ratio of medians | ratio of aggregates |")
    L.append("|---|---|---|---|---|---|")
    for c in comps.values():
        for x in c["rounds"]:
            L.append(f"| {c['title'][:2]} vs {c['baseline']} | {x['round']} | {_rate(x['ftcluster'])} | "
                     f"{_rate(x['baseline'])} | {x['ratio']:.2f}x | {x['ratio_aggregate']:.2f}x |")
    L.append("")
    L.append("Aggregate = sum of real tokens / sum of step times over the measured steps. Per run (peak RSS: the "
             "training process's: for ftcluster its rank, not the launcher around it):\n")
    L.append("| run | median step time | real tokens / step | padded tokens / step | examples / step | "
             "matmul GFLOP/s | peak RSS | 1-min load during the run |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        f, ld = r["figures"], r["load1_during"]
        rss = f"{r['trainer_peak_rss_mib']:.0f} MiB" if r.get("trainer_peak_rss_mib") else "?"
        gflops = f"{f['matmul_gflops_per_s']:.0f}" if "matmul_gflops_per_s" in f else "-"
        L.append(f"| {r['tag']} | {f['median_step_s'] * 1000:.0f} ms | {_f(f['real_tokens_per_step'])} | "
                 f"{_f(f['padded_tokens_per_step'])} | {f['examples_per_step']:.1f} | {gflops} | {rss} | "
                 f"{ld.get('min', '?')}-{ld.get('max', '?')} (median {ld.get('median', '?')}) |")
    L.append("\nA baseline's step time is a whole loop iteration (on_step_end to on_step_end). Counting only "
             "on_step_begin to on_step_end (leaving out fetching and collating the step's micro-batches and the "
             "per-step logging), the per-round ratios would be: "
             + "; ".join(f"comparison {c['title'][:1]} " + ", ".join(f"{x['ratio_baseline_core_time']:.2f}x"
                                                                       for x in c["rounds"]) for c in comps.values())
             + ".\n")
    trl_p = runs.get("r1-trl-packed")
    L.append("" if trl_p is None else f"SFTTrainer's packing (comparison 3): BFD packed the {ds['records']} examples into "
             f"{trl_p['prepared']['rows']} rows of at most {a['max_seq_len']} tokens ({trl_p['prepared']['fill']:.1%} "
             f"full; ftcluster: {ds['prepared_packed']['train']['rows']} rows, "
             f"{ds['prepared_packed']['train']['packing_efficiency']:.1%}). TRL always trains BFD-packed rows "
             "padding-free: the rows of a micro-batch go back to back into one sequence, with position_ids "
             "restarting per example and no attention_mask, meant for flash-attention's variable-length kernels. With "
             "sdpa (no flash-attention here) transformers turns those position_ids into a block-diagonal mask over the "
             f"whole flattened sequence (~{a['micro_batch'] * a['max_seq_len']} tokens), so attention costs grow with the "
             f"micro-batch's total length squared; ftcluster's packed micro-batch is {a['micro_batch']} rows of "
             f"{a['max_seq_len']} with a block-diagonal mask per row. TRL's preparation (tokenized rows in, packing) "
             f"took {trl_p['setup_s']:.1f} s of trainer construction, outside the timed steps.\n")
    L.append("" if with_trl else "TRL's SFTTrainer left out of this measurement (--baselines trainer).\n")
    la = res["loss_agreement"]
    L.append(("Correctness check (comparisons 2 and 4 read identical micro-batches on all three sides)" if with_trl else
              "Correctness check (comparison 2 reads identical micro-batches on both sides)") + ": per-step "
             "losses of the first round's ftcluster unpacked run against "
             + "; ".join(f"{SAME_BATCHES[name]}: at most {d['max_abs_diff']:.2e} apart over {d['steps_compared']} steps (step 1: "
                         f"{d['first'][0]:.5f} vs {d['first'][1]:.5f}; last: {d['last'][0]:.5f} vs {d['last'][1]:.5f})"
                         for name, d in la.items()) + ".\n")
    if res.get("notes"):
        L.append("## Notes\n")
        L.extend(f"- {n}" for n in res["notes"])
        L.append("")
    L.append("## Machine\n")
    L.append(f"- date: {res['date']} (runs from {res['started_at']} to {res['finished_at']})")
    L.append(f"- CPU: {env['cpu_model']}, {env['cores']} cores (os.cpu_count), {env['platform']}")
    L.append(f"- quiet before start: {'yes' if q['quiet'] else 'NO' if q['quiet'] is False else 'not checked'} "
             f"(1-min load {q['load1']:.2f} after waiting {q['waited_s']} s for load < {a['quiet_load']} and no other "
             f"`ftcluster train`/`pytest`" + (f"; still running: {'; '.join(q['busy'])}" if q['busy'] else "") + ")")
    omp = sorted({v for r in res["runs"] if r["side"] == "ftcluster" for k, v in r["omp_num_threads"].items()
                  if re.search(TRAINING_PROCESS[launcher], k) and v})
    hf_threads = sorted({r["torch_threads"] for r in res["runs"] if r["side"] != "ftcluster"})
    L.append(f"- threads: ftcluster's training process had OMP_NUM_THREADS={', '.join(omp) or '?'} "
             f"(launcher.cpus_per_worker={a['threads']}); the Trainer and SFTTrainer processes ran "
             f"torch.set_num_threads({a['threads']}) (torch reported {', '.join(map(str, hf_threads))})")
    L.append("- packages: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    L.append(f"- git: {env['git']['sha']} ({env['git']['dirty_files']} changed/untracked files in the tree at run time)\n")
    L.append("## Data set\n")
    L.append(f"{ds['records']} single-turn chats (system `{SYSTEM}`, user, assistant) of random English words, built "
             f"with seed {a['seed']}; target lengths log-uniform on [{a['min_len']}, {a['max_len']}] tokens. Token counts "
             f"per example under the {model} tokenizer with the chat template:\n")
    d = ds["lengths"]
    L.append("| min | p10 | p25 | median | p75 | p90 | max | mean | total |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    L.append(f"| {d['min']} | {d['p10']} | {d['p25']} | {d['median']} | {d['p75']} | {d['p90']} | {d['max']} | "
             f"{d['mean']} | {d['sum']} |")
    st_p, st_u = ds["prepared_packed"], ds["prepared_unpacked"]
    L.append(f"\nPrepared by ftcluster: packed {st_p['train']['examples']} examples into {st_p['train']['rows']} rows "
             f"(packing efficiency against max_seq_len {st_p['train']['packing_efficiency']:.1%}); unpacked "
             f"{st_u['train']['rows']} rows; {st_u['train']['trainable_tokens']} of {st_u['train']['tokens']} tokens "
             f"carry a label (assistant tokens); truncated {st_u['train']['truncated']}, dropped "
             f"{st_u['train']['dropped']}. The Trainer and the SFTTrainer trained on the rows of the ftcluster "
             f"data.packing=false preparation (data fingerprint {'identical' if ds['same_fingerprint'] else 'DIFFERENT'} "
             f"to the ftcluster unpacked run's), as pre-tokenized rows with labels: TRL's assistant_only_loss refuses "
             f"this chat template (no generation markers), and labels given as is make the token and label sets "
             f"identical on all sides.\n")
    L.append("## Settings and commands\n")
    L.append(f"- max_seq_len {a['max_seq_len']}; {a['micro_batch']} rows per micro-batch, {a['global_batch']} rows per "
             f"optimizer step (gradient accumulation {a['global_batch'] // a['micro_batch']}); torch fused AdamW "
             f"lr {a['lr']}, "
             f"betas (0.9, 0.999), eps 1e-8, weight decay 0, constant schedule, no warm-up, gradient clipping 1.0; fp32; "
             f"no gradient checkpointing; sdpa attention; {w} warm-up + {a['steps']} measured steps; {a['rounds']} "
             f"round(s) of ({', '.join(ROUND_NAMES[name] for name in round_order(with_trl))}); seed {a['seed']}.")
    L.append("- A row is one example for the Trainer, the unpacked SFTTrainer and ftcluster data.packing=false, and "
             "up to max_seq_len tokens of several examples when packed: the same number of rows per step carries "
             "more real tokens when packed. Tokens/s divides by the step time, so the comparison is per real token.")
    L.append("- Step time: ftcluster's own (sft.py: the loader's micro-batches, forward/backward/optimizer, the loss "
             "all-reduce), from `tokens_per_s` in metrics.jsonl; the baselines' from on_step_end to on_step_end.")
    L.append("- Initial weights: " + ("ftcluster.train.random_init.materialize_random_init(tiny, seed) written once to a "
                                      "folder" if model == "tiny" else "the pretrained weights of ftcluster's converted "
                                      f"`model={model}` folder") + "; every side loads that folder (ftcluster with "
             "model.path=... model.init=pretrained).")
    L.append("- Row order: the Trainer and the unpacked SFTTrainer read the unpacked rows in the order ftcluster's "
             "loader reads them (train_sampling_strategy=\"sequential\" over that order); the packed SFTTrainer reads "
             "its own packed rows in its default seeded random order. Every side sets use_cache=False.")
    L.append("- SFTTrainer: SFTConfig's defaults bf16=True and gradient_checkpointing=True are turned off to match; "
             "its loss is its default (the fused LM head, which scores only labelled positions without building "
             "the full logits, and logs entropy and token accuracy per step).\n")
    first_ft = next(r for r in res["runs"] if r["side"] == "ftcluster")
    L.append("ftcluster (packed; the unpacked runs differ only in `data.packing=false` and `output_dir`):\n")
    L.append("```bash\n" + first_ft["command"].replace(" model=", " \\\n  model=", 1) + "\n```\n")
    for tag, what in (("r1-trainer-a", "Trainer"), ("r1-trl-unpacked", "SFTTrainer, unpacked"),
                      ("r1-trl-packed", "SFTTrainer, packed")):
        if tag not in runs:
            continue
        r = runs[tag]
        config = "TrainingArguments" if r["side"] == "trainer" else "SFTConfig"
        order = " and their order" if r["arguments"]["train_sampling_strategy"] == "sequential" else ""
        L.append(f"{what} (`{r['command']}`; the spec file names the model folder, the prepared rows{order}):\n")
        L.append(f"```python\n{config}(" + ", ".join(f"{k}={v!r}" for k, v in r["arguments"].items())
                 + ")\n" + r["collator"] + "\n```\n")
    L.append("Reproduce: `" + res["reproduce"] + "`\n")
    md_path.write_text("\n".join(L))


def pretrained_folder(model: str) -> Path:
    """The converted folder of a conf/model/ name (SmolLM2: the bundled model, converted on first use)."""
    from ftcluster.config import compose
    from ftcluster.train.bundled import resolve_model_path

    return Path(resolve_model_path(compose([f"model={model}"]).model.path))


def rewrite_report(json_path: Path, notes: list[str]) -> None:
    """Recompute the summaries of a finished measurement from its raw figures and rewrite .json and .md."""
    res = json.loads(json_path.read_text())
    res["notes"] = [*res.get("notes", []), *notes]
    if "matmul_weights" not in res:  # measured before the report had them: the model's shape gives them
        model = res["settings"].get("model", "tiny")
        res["matmul_weights"] = matmul_weights(TINY if model == "tiny" else pretrained_folder(model))
    summarize(res)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, json_path.with_suffix(".md"))
    print(f"[bench] rewrote {json_path.with_suffix('.md')} and {json_path}", flush=True)


# ----------------------------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny",
                   help="what every side trains; smollm2 changes the other defaults (see MODELS)")
    p.add_argument("--baselines", choices=["trainer,trl", "trainer"], default="trainer,trl",
                   help="the Hugging Face sides to run (the Trainer always)")
    p.add_argument("--hf-worker", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="3 measured steps after 1 warm-up, 1 round, 200 records")
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--min-len", type=int, default=32, help="shortest target length in tokens (the framing is ~30)")
    p.add_argument("--max-len", type=int, default=480)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local", help="how ftcluster places its rank")
    p.add_argument("--report-from", metavar="JSON", help="measure nothing: rebuild the report of a finished "
                                                          "measurement from its .json (raw figures)")
    add_run_arguments(p, steps=30)
    p.set_defaults(**MODELS[p.parse_known_args()[0].model]["defaults"])
    a = p.parse_args()
    if a.hf_worker:
        hf_worker(a.hf_worker)
        return 0
    if a.report_from:
        rewrite_report(Path(a.report_from), a.note)
        return 0
    if a.smoke:
        a.steps, a.warmup, a.rounds, a.records = 3, 1, 1, min(a.records, 200)
    if a.max_len > a.max_seq_len:
        p.error("--max-len must not exceed --max-seq-len (nothing is truncated)")
    if a.global_batch % a.micro_batch:
        p.error("--global-batch must be a multiple of --micro-batch")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ftcluster.util.quiet import quiet_libraries

    quiet_libraries()
    work, out = folders(a, "ftcluster-bench-")

    from ftcluster.config import compose
    from ftcluster.data.loader import GlobalBatchLoader
    from ftcluster.data.prepare import prepare
    from ftcluster.train.random_init import materialize_random_init
    from ftcluster.train.tokenizer import load_tokenizer

    # One weight file for every side.
    if a.model == "tiny":
        model_dir = Path(materialize_random_init(str(TINY), work / "init_model", a.seed))
    else:
        model_dir = pretrained_folder(a.model)
    tokenizer = load_tokenizer(str(model_dir))
    data_path = work / "train.jsonl"
    lengths = build_dataset(data_path, a.records, a.min_len, a.max_len, a.max_seq_len, a.seed, tokenizer)
    print(f"[bench] data set: {_distribution(lengths)}", flush=True)

    # The baselines' rows: ftcluster.data.prepare with data.packing=false, exactly what the unpacked run prepares.
    hf_cfg = compose(ftcluster_overrides(a, data_path, model_dir, False, work / "runs" / "unused"))
    hf_stats = prepare(hf_cfg, load_tokenizer(str(model_dir)), str(work / "hf_data"))
    from ftcluster.data.rows import read_rows

    hf_rows = work / "hf_data" / "train"
    order_loader = GlobalBatchLoader(read_rows(hf_rows), a.global_batch, a.micro_batch, 0, 1,
                                     a.seed, True, hf_stats["pad_id"], False)
    total = a.warmup + a.steps
    order = [i for step in range(total) for i in order_loader.global_rows(step)]

    quiet = {"quiet": None, "waited_s": 0, "load1": load1(), "busy": busy_processes()}
    if a.wait_quiet > 0:
        quiet = wait_for_quiet(a.wait_quiet, a.quiet_load)
        print(f"[bench] machine {'quiet' if quiet['quiet'] else 'NOT quiet'}: {quiet}", flush=True)

    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs = []
    start_run = {
        "trl-packed": lambda tag: run_baseline(a, work, model_dir, hf_rows, "trl", True, None, tag),
        "ftcluster-packed": lambda tag: run_ftcluster(a, work, data_path, model_dir, True, tag),
        "trainer-a": lambda tag: run_baseline(a, work, model_dir, hf_rows, "trainer", False, order, tag),
        "trl-unpacked": lambda tag: run_baseline(a, work, model_dir, hf_rows, "trl", False, order, tag),
        "ftcluster-unpacked": lambda tag: run_ftcluster(a, work, data_path, model_dir, False, tag),
        "trainer-b": lambda tag: run_baseline(a, work, model_dir, hf_rows, "trainer", False, order, tag),
    }
    for r in range(1, a.rounds + 1):
        rate = {}
        for name in round_order("trl" in a.baselines):
            runs.append(start_run[name](f"r{r}-{name}"))
            rate[name] = figures(runs[-1], a.warmup)["median_tokens_per_s"]
        print(f"[bench] round {r}: " + ", ".join(f"{ft_name} / {base} {rate[ft_name] / rate[base]:.2f}x"
                                                 for _, ft_name, base, *_ in COMPARISONS if base in rate), flush=True)
    finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    ft_u1 = next(x for x in runs if x["side"] == "ftcluster" and not x["packing"])
    packed_stats = next(x for x in runs if x["side"] == "ftcluster" and x["packing"])["data_stats"]
    date = time.strftime("%Y-%m-%d")
    res = {
        "date": date, "started_at": started_at, "finished_at": finished_at, "smoke": a.smoke,
        "settings": {k: v for k, v in vars(a).items() if k not in ("hf_worker", "workdir", "out", "report_from", "note")},
        "environment": environment(PACKAGES),
        "quiet": quiet, "workdir": str(work),
        "reproduce": "python benchmarks/sft_baselines.py" + (" --smoke" if a.smoke else "")
                     + ("" if a.launcher == "local" else f" --launcher {a.launcher}")
                     + ("" if a.model == "tiny" else f" --model {a.model}"),
        "dataset": {"records": a.records, "lengths": _distribution(lengths), "prepared_unpacked": hf_stats,
                    "prepared_packed": packed_stats,
                    "same_fingerprint": ft_u1["data_stats"]["fingerprint"] == hf_stats["fingerprint"]},
        "notes": list(a.note),
        "matmul_weights": matmul_weights(model_dir),
        "runs": runs,
    }
    if not res["dataset"]["same_fingerprint"]:
        res["notes"].append("The baselines' prepared rows do not have the fingerprint of ftcluster's unpacked run.")
    summarize(res)
    stem = "_".join(["sft_baselines", *([a.model] if a.model != "tiny" else []),
                     *([a.launcher] if a.launcher != "local" else []), "cpu", date])
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out / f"{stem}.md")
    for c in res["comparisons"].values():
        target = f"; target >= {c['target']}x: {c['verdict']}" if c["target"] is not None else ""
        print(f"[bench] {c['title']}: {c['ratio']:.2f}x (rounds: " + ", ".join(f"{x['ratio']:.2f}x" for x in c["rounds"])
              + target + ")", flush=True)
    print(f"[bench] wrote {out / (stem + '.md')} and {out / (stem + '.json')}", flush=True)
    drop_run_weights(a, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
