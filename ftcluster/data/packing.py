"""Packing encoded examples into fixed-budget rows.

A packed row says where its examples begin by their lengths (`example_lengths`, a few numbers a row, where a
position id per token was a third of the bytes written); ftcluster.data.collate turns them into the example
boundaries attention needs and the positions restarting at 0 (see there).
"""

from __future__ import annotations

import heapq

from ftcluster.data.template import IGNORE

Example = tuple[list[int], list[int]]  # (input_ids, labels)


def pack(examples: list[Example], max_seq_len: int) -> list[dict]:
    """Best-fit decreasing (see pack_order): the rows themselves."""
    return [_row([examples[i] for i in row]) for row in pack_order([len(ids) for ids, _ in examples], max_seq_len)]


def pack_order(lengths, max_seq_len: int) -> list[list[int]]:
    """Best-fit decreasing from token lengths alone: longest examples first, each into the fullest row it fits
    (ties: oldest row). The examples' indices, row by row.

    Deterministic for a given input order; no example is split or repeated. Needing only lengths, it runs in
    the driver over any number of examples whose tokens stay in the prepare workers' shards.

    Rows wait in buckets by the room they have left (a heap of row numbers each, so the oldest comes first), and
    a bit set of the non-empty buckets finds the best fit in a few integer operations: the time per example
    does not grow with the number of rows (a sorted list of rows did, and took minutes at a million examples).
    """
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    members: list[list[int]] = []
    waiting: list[list[int]] = [[] for _ in range(max_seq_len + 1)]  # room left -> rows with that room
    nonempty = 0  # bit r set: some row has exactly r tokens of room left
    for i in order:
        n = lengths[i]
        if not 0 < n <= max_seq_len:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..{max_seq_len} (truncate first)")
        fits = nonempty >> n
        if fits:
            left = n + (fits & -fits).bit_length() - 1  # the least room that still fits n: the fullest row
            row = heapq.heappop(waiting[left])
            if not waiting[left]:
                nonempty &= ~(1 << left)
            members[row].append(i)
            left -= n
        else:
            row, left = len(members), max_seq_len - n
            members.append([i])
        if left > 0:
            heapq.heappush(waiting[left], row)
            nonempty |= 1 << left
    return members


def unpacked(examples: list[Example]) -> list[dict]:
    """One example per row, in the same row layout as `pack`."""
    return [_row([example]) for example in examples]


def _row(parts: list[Example]) -> dict:
    input_ids, labels = [], []
    for ids, labs in parts:
        input_ids += ids
        # The first token of an example is never a target: otherwise the previous example's last token
        # would learn to predict it.
        labels += [IGNORE] + list(labs[1:])
    return {"input_ids": input_ids, "labels": labels, "example_lengths": [len(ids) for ids, _ in parts],
            "num_examples": len(parts)}


def packing_efficiency(rows: list[dict], max_seq_len: int) -> float:
    """Real tokens over the token budget of the rows (1.0: no row has room left)."""
    return token_efficiency(sum(len(row["input_ids"]) for row in rows), len(rows), max_seq_len)


def token_efficiency(tokens: int, rows: int, max_seq_len: int) -> float:
    """packing_efficiency from the totals alone."""
    return tokens / (rows * max_seq_len) if rows else 0.0
