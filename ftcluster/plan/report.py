"""What `ftcluster plan` prints: a table of the candidates (or their JSON) and the recommendation last."""

from __future__ import annotations

import json
from dataclasses import asdict

from ftcluster.plan.planner import Candidate, Plan
from ftcluster.plan.profiles import GIB

COLUMNS = ["strategy", "ckpt", "micro", "accum", "params", "optim", "grads", "activ", "host", "peak", "fits",
           "step s", "tokens/s", "MFU"]


def as_json(result: Plan) -> str:
    recommended = result.recommended
    return json.dumps({
        "model": {**result.shape.__dict__, "total_params": result.total_params,
                  "trainable_params": result.trainable_params},
        "cluster": asdict(result.profile),
        "global_batch": result.global_batch,
        "candidates": [c.as_dict() for c in result.candidates],
        "recommended": recommended.as_dict() if recommended else None,
        "recommended_overrides": recommended.overrides() if recommended else None,
    }, indent=2)


def as_table(result: Plan, every_candidate: bool = False) -> str:
    """One row per strategy and checkpointing choice (its fastest micro-batch that fits, else its smallest),
    or every candidate. Memory per device (K, M, G: 2^10, 2^20, 2^30 bytes): what each part needs wherever
    it lives (`host`: the part offloaded to host memory), and the device's peak."""
    p, shape = result.profile, result.shape
    peak = ", ".join(f"{k} {v:.3g}" for k, v in p.peak_tflops.__dict__.items() if v)
    lines = [f"model: {shape.model_type}, {shape.layers} layers, hidden {shape.hidden}, "
             f"{_count(result.total_params)} parameters, {_count(result.trainable_params)} trained",
             f"cluster: {p.name}, {p.nodes} node(s) x {p.gpus_per_node} {p.device}(s), "
             f"{p.memory_gib:.1f} GiB each ({p.memory_gib - p.reserved_gib:.1f} usable), peak TFLOP/s {peak}",
             "global batch: " + (f"{result.global_batch} rows per step" if result.global_batch else
                                 "one micro-batch per device per step (set trainer.global_batch to fix it)"),
             ""]
    rows = result.candidates if every_candidate else _best_per_choice(result.candidates)
    table = [COLUMNS] + [_row(c) for c in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines += ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
              for r in table]
    recommended = result.recommended
    lines.append("")
    if recommended is None:
        smallest = min(result.candidates, key=lambda c: c.prediction.peak_bytes_per_rank)
        lines.append(f"nothing fits: the smallest peak is {smallest.prediction.peak_bytes_per_rank / GIB:.1f} GiB "
                     f"({_label(smallest)}) against {smallest.prediction.usable_bytes_per_rank / GIB:.1f} GiB usable; "
                     f"add devices (cluster.nodes=N), use peft=lora, or shorten trainer.max_seq_len")
    else:
        pred = recommended.prediction
        lines.append(f"recommended: {_label(recommended)}: {pred.peak_bytes_per_rank / GIB:.1f} GiB per device, "
                     f"{pred.step_time_s:.3g} s per step, {pred.tokens_per_s:,.0f} tokens/s, MFU {pred.mfu:.0%}")
        lines.append("  ftcluster train " + " ".join(recommended.overrides()))
    return "\n".join(lines)


def _best_per_choice(candidates: list[Candidate]) -> list[Candidate]:
    groups: dict[tuple, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault((c.strategy, c.gradient_checkpointing), []).append(c)
    best = []
    for group in groups.values():
        fitting = [c for c in group if c.prediction.fits]
        best.append(max(fitting, key=lambda c: c.prediction.tokens_per_s) if fitting else group[0])
    return best


def _row(c: Candidate) -> list[str]:
    m, p = c.prediction.memory, c.prediction
    return [c.strategy, "on" if c.gradient_checkpointing else "off", str(c.micro_batch), str(c.grad_accum),
            _size(m.params), _size(m.optimizer), _size(m.gradients), _size(m.activations), _size(m.host),
            _size(p.peak_bytes_per_rank),
            "yes" if p.fits else "no", f"{p.step_time_s:.3g}", f"{p.tokens_per_s:,.0f}", f"{p.mfu:.0%}"]


def _size(n: int) -> str:
    for unit, scale in (("G", GIB), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B" if n else "0"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _label(c: Candidate) -> str:
    return (f"{c.strategy}, gradient checkpointing {'on' if c.gradient_checkpointing else 'off'}, "
            f"micro-batch {c.micro_batch}")

