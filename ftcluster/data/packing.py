"""Packing encoded examples into fixed-budget rows, and collating rows into model inputs.

A packed row keeps its examples apart through `position_ids` alone: they restart at 0 for each example,
and with `attention_mask=None` Hugging Face transformers (5.x) turns every restart into a block boundary
of the causal mask (sdpa, eager) or into varlen boundaries (flash_attention_2). The model must run with
`use_cache=False`: when it builds a cache it skips that detection and attends across examples.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import torch

from ftcluster.data.template import IGNORE

Example = tuple[list[int], list[int]]  # (input_ids, labels)


def pack(examples: list[Example], max_seq_len: int) -> list[dict]:
    """Best-fit decreasing: longest examples first, each into the fullest row it fits (ties: oldest row).

    Deterministic for a given input order; no example is split or repeated.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    members: list[list[int]] = []
    # (room left, row index), sorted, so the best fit is one bisection away.
    room: list[tuple[int, int]] = []
    for i in order:
        n = len(examples[i][0])
        if not 0 < n <= max_seq_len:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..{max_seq_len} (truncate first)")
        k = bisect_left(room, (n, -1))
        if k == len(room):
            members.append([i])
            row, left = len(members) - 1, max_seq_len - n
        else:
            left, row = room.pop(k)
            members[row].append(i)
            left -= n
        if left > 0:
            insort(room, (left, row))
    return [_row([examples[i] for i in row]) for row in members]


def unpacked(examples: list[Example]) -> list[dict]:
    """One example per row, in the same row layout as `pack`."""
    return [_row([example]) for example in examples]


def _row(parts: list[Example]) -> dict:
    input_ids, labels, position_ids = [], [], []
    for ids, labs in parts:
        input_ids += ids
        # The first token of an example is never a target: otherwise the previous example's last token
        # would learn to predict it.
        labels += [IGNORE] + list(labs[1:])
        position_ids += range(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_examples": len(parts)}


def collate(rows: list[dict], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one. Packed batches carry no attention_mask (see the module doc).

    Besides the model inputs and `labels`, the batch counts its work for throughput metrics:
    `num_examples` and `num_tokens` (real tokens, padding excluded), as 0-d tensors.
    """
    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    if not packed:
        batch["attention_mask"] = []
    for row in rows:
        n = len(row["input_ids"])
        pad = width - n
        batch["input_ids"].append(list(row["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(row["labels"]) + [IGNORE] * pad)
        if packed:
            # Padding restarts at 0, so it forms a block of its own and no real token attends to it.
            batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
        else:
            batch["position_ids"].append(list(range(width)))
            batch["attention_mask"].append([1] * n + [0] * pad)
    batch["num_examples"] = sum(row["num_examples"] for row in rows)
    batch["num_tokens"] = sum(len(row["input_ids"]) for row in rows)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def packing_efficiency(rows: list[dict], max_seq_len: int) -> float:
    """Real tokens over the token budget of the rows (1.0: no row has room left)."""
    if not rows:
        return 0.0
    return sum(len(row["input_ids"]) for row in rows) / (len(rows) * max_seq_len)
