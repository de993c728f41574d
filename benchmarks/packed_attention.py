"""Packed attention on this CPU: the old block-masked sdpa against per-example sdpa and flex attention.

Times one micro-batch of packed rows through the model, forward and backward (a training step without the
optimizer) and forward only (an eval pass), on random weights of two shapes: the tiny model and
SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152). The layouts:
- masked: today's right-padded [B, L] packed rows; sdpa with the block-diagonal mask from position ids;
- varlen: the flattened [1, ΣL] collate with cu_seq_lens; ftcluster.train.attention's per-example sdpa;
- flex: the flattened collate; transformers' flex_attention with its document mask (from position ids).
  torch 2.13 has no flex backward on CPU, so flex is timed forward only.
Prints a Markdown table (median seconds of --repeats after one warm-up) and the loss each layout gives,
which must agree.

    python benchmarks/packed_attention.py --out benchmarks/results/packed_attention_cpu_2026-12-05.md
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from ftcluster.config import ASSETS
from ftcluster.data.collate import collate, model_inputs
from ftcluster.data.packing import pack, packing_efficiency
from ftcluster.data.template import IGNORE
from ftcluster.train.attention import VARLEN_SDPA, register

SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True)
# (config, row length, example lengths in tokens): SmolLM2's like the 10-250-word chats of issue 23.
SHAPES = {"tiny": (lambda: AutoConfig.from_pretrained(ASSETS / "models" / "tiny"), 256, (20, 120)),
          "smollm2": (lambda: SMOLLM2, 1024, (30, 400))}
LAYOUTS = {"masked": ("sdpa", False), "varlen": (VARLEN_SDPA, True), "flex": ("flex_attention", True)}


def rows_of(vocab: int, row_len: int, lengths: tuple[int, int], count: int) -> list[dict]:
    rng = random.Random(0)
    examples = []
    for _ in range(count * row_len // sum(lengths) * 4):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))]
        examples.append((ids, [IGNORE] + ids[1:]))
    return pack(examples, row_len)[:count]


def step_seconds(model, batch: dict, backward: bool, repeats: int) -> tuple[float, float]:
    """Median seconds over `repeats` after a warm-up, and the summed loss."""
    times = []
    for k in range(repeats + 1):
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            logits = model(**model_inputs(batch, "cpu"), use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                   ignore_index=IGNORE, reduction="sum")
            if backward:
                loss.backward()
                model.zero_grad(set_to_none=True)
        if k:
            times.append(time.perf_counter() - start)
    return statistics.median(times), loss.item()


def measure(shape: str, micro_batch: int, repeats: int) -> list[dict]:
    make_config, row_len, lengths = SHAPES[shape]
    config = make_config()
    rows = rows_of(config.vocab_size, row_len, lengths, micro_batch)
    torch.manual_seed(0)
    weights = AutoModelForCausalLM.from_config(config).state_dict()
    results = []
    for layout, (attn, flat) in LAYOUTS.items():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        model.load_state_dict(weights)
        batch = collate(rows, pad_id=0, packed=True) if flat else _padded_packed(rows)
        for backward in (True, False):
            if backward and layout == "flex":
                continue  # NotImplementedError: FlexAttention does not support backward on CPU
            model.train(backward)
            seconds, loss = step_seconds(model, batch, backward, repeats)
            results.append({"shape": shape, "layout": layout, "pass": "fwd+bwd" if backward else "fwd",
                            "seconds": seconds, "loss": loss, "rows": len(rows),
                            "tokens": sum(len(r["input_ids"]) for r in rows),
                            "examples": sum(r["num_examples"] for r in rows),
                            "efficiency": packing_efficiency(rows, row_len)})
            print(results[-1], flush=True)
    return results


def _padded_packed(rows: list[dict]) -> dict:
    """The collate before flattening: packed rows right-padded, padding a position block of its own, no mask."""
    width = max(len(row["input_ids"]) for row in rows)
    pad = [width - len(row["input_ids"]) for row in rows]
    return {"input_ids": torch.tensor([r["input_ids"] + [0] * p for r, p in zip(rows, pad)]),
            "labels": torch.tensor([r["labels"] + [IGNORE] * p for r, p in zip(rows, pad)]),
            "position_ids": torch.tensor([r["position_ids"] + list(range(p)) for r, p in zip(rows, pad)])}


def table(results: list[dict]) -> str:
    lines = ["| shape | pass | layout | seconds (median) | vs masked | summed loss |", "|---|---|---|---|---|---|"]
    base = {(r["shape"], r["pass"]): r["seconds"] for r in results if r["layout"] == "masked"}
    for r in results:
        ratio = base[(r["shape"], r["pass"])] / r["seconds"]
        lines.append(f"| {r['shape']} | {r['pass']} | {r['layout']} | {r['seconds']:.3f} | {ratio:.2f}x | "
                     f"{r['loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--micro-batch", type=int, default=2, help="packed rows per micro-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    register()
    load = os.getloadavg()[0]
    results = [r for shape in args.shapes for r in measure(shape, args.micro_batch, args.repeats)]
    text = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start {load:.2f}, "
            f"micro-batch {args.micro_batch} packed rows, {args.repeats} repeats\n\n{table(results)}\n")
    for shape in args.shapes:
        r = next(r for r in results if r["shape"] == shape)
        text += (f"\n{shape}: {r['rows']} rows, {r['tokens']} tokens, {r['examples']} examples, "
                 f"packing efficiency {r['efficiency']:.1%}")
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
