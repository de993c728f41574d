"""Peak memory and time of one SFT micro-batch (forward + backward) with the model's full logits (as
ftcluster took them before the head projected labelled positions only), with ftcluster's loss from the
labelled positions in one piece (trainer.loss_chunk_tokens=0, the default) and in recomputed chunks
(loss_chunk_tokens=N, ftcluster.objectives.chunked), side by side, on the tiny model's shape with a
Llama-3-sized vocabulary (128256) where the logits dominate.

Each side runs in a fresh process (so one side's freed memory cannot serve the other's peak), with glibc
set to hand freed blocks back at once (ftcluster.observe.peak_memory.return_freed_memory), so the resident
set follows the live tensors. Per side: the peak resident set of the measured step over the resident set
before it (Linux: VmHWM reset through /proc/self/clear_refs), the bytes autograd saves for backward other
than weights, the step time (median of the measured steps) and the loss, which must agree across sides.

    python benchmarks/chunked_loss.py                       # report to benchmarks/results/
    python benchmarks/chunked_loss.py --tokens 1024 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

HIDDEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=2)
PROMPT_TOKENS = 64  # unlabelled at the start of each row, as a chat prompt would be


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(vocab: int, rows: int, width: int, chunk_tokens: int, steps: int) -> dict:
    """One side, in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftcluster.data.template import IGNORE
    from ftcluster.objectives.cross_entropy import next_token_targets, token_loss_sum
    from ftcluster.observe.peak_memory import return_freed_memory

    return_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HIDDEN, vocab_size=vocab, max_position_embeddings=width,
                                         attn_implementation="sdpa"))
    input_ids = torch.randint(3, vocab, (rows, width), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :PROMPT_TOKENS] = IGNORE
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(width).expand(rows, -1)}

    def loss_sum() -> torch.Tensor:
        if chunk_tokens >= 0:
            return token_loss_sum(model, batch, chunk_tokens)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        targets = next_token_targets(labels)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                                 reduction="sum")

    def step() -> float:
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the step's peak is its activations
        loss = loss_sum()
        loss.backward()
        return loss.item()

    step()  # warm-up: allocates the gradients
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss_sum()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}  # once per storage
    saved_bytes = sum(size for ptr, size in storages.items() if ptr not in weights)
    saved.clear()  # the graph they belong to is gone; drop the references before measuring
    times, peaks = [], []
    for _ in range(steps):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        peaks.append(_status_kib("VmHWM") - before)
    return {"chunk_tokens": chunk_tokens, "loss": loss, "step_s": statistics.median(times),
            "peak_over_start_mib": max(peaks) / 1024, "saved_for_backward_mib": saved_bytes / 2**20,
            "label_tokens": int((labels[:, 1:] != IGNORE).sum())}


def run_side(args, chunk_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--side", str(chunk_tokens), "--vocab", str(args.vocab), "--rows",
           str(args.rows), "--tokens", str(args.tokens), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, sides: list[dict]) -> str:
    from common import environment

    env = environment(["torch", "transformers"])
    full = sides[0]
    logits_mib = args.rows * args.tokens * args.vocab * 4 / 2**20
    lines = [
        f"# Chunked cross-entropy vs full logits: peak memory of one micro-batch on CPU ({datetime.date.today()})",
        "",
        f"`python benchmarks/chunked_loss.py --vocab {args.vocab} --rows {args.rows} --tokens {args.tokens} "
        f"--chunks {' '.join(map(str, args.chunks))} --steps {args.steps}`",
        "",
        f"Model: the tiny Llama's shape (2 layers, hidden 64) with a {args.vocab}-token vocabulary, fp32, untied "
        f"head. One micro-batch of {args.rows} rows x {args.tokens} tokens, the first {PROMPT_TOKENS} of each row "
        f"unlabelled ({full['label_tokens']} label tokens). Forward + backward of `token_loss_sum` (the full-logits "
        "side: the model's logits and cross-entropy over them); full [tokens, "
        f"vocab] logits in fp32 would be {logits_mib:.0f} MiB. Each side in a fresh process, freed memory "
        "handed back to the OS at once; figures from the last of the measured steps after one warm-up.",
        "",
        "- peak over start: the resident set's high-water mark during the step less the resident set before it "
        "(weights, gradients and the process itself excluded).",
        "- saved for backward: what autograd keeps between forward and backward, weights excluded.",
        "",
        "| loss_chunk_tokens | peak over start (MiB) | saved for backward (MiB) | step (s) | loss |",
        "|---|---|---|---|---|",
    ]
    for side in sides:
        name = {-1: "full logits", 0: "0 (labelled positions, one piece)"}.get(side["chunk_tokens"],
                                                                               str(side["chunk_tokens"]))
        lines.append(f"| {name} | {side['peak_over_start_mib']:.0f} | {side['saved_for_backward_mib']:.1f} | "
                     f"{side['step_s']:.2f} | {side['loss']:.6f} |")
    lines += ["", "Largest loss difference from the full-logits side: "
              f"{max(abs(s['loss'] - full['loss']) / abs(full['loss']) for s in sides):.1e} (relative).", "",
              "Machine: " + json.dumps(env, default=str), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per row")
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--side", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                   f"chunked_loss_cpu_{datetime.date.today()}.md")
    args = p.parse_args()
    if args.side is not None:
        print(json.dumps(measure(args.vocab, args.rows, args.tokens, args.side, args.steps)))
        return
    sides = [run_side(args, chunk) for chunk in [-1, 0, *args.chunks]]  # -1: the full logits
    args.out.write_text(report(args, sides))
    args.out.with_suffix(".json").write_text(json.dumps(sides, indent=1))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
