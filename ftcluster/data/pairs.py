"""Preference pairs as model inputs: one row per pair (both sides' ids and labels), and batches that put
the chosen and the rejected responses through one concatenated forward.

Labels mark the response tokens only (the prompt is shared and carries no preference), so a side's
sequence log-probability is the sum over its labelled tokens.
"""

from __future__ import annotations

import datasets
import torch

from ftcluster.data.template import IGNORE, encode_chat

SIDES = ("chosen", "rejected")

FEATURES = datasets.Features({
    "chosen_input_ids": datasets.List(datasets.Value("int32")),
    "chosen_labels": datasets.List(datasets.Value("int32")),
    "rejected_input_ids": datasets.List(datasets.Value("int32")),
    "rejected_labels": datasets.List(datasets.Value("int32")),
    "margin": datasets.Value("float32"),
})


def encode_pair(example: dict, tokenizer) -> dict:
    """Both sides rendered after the shared prompt; labels on each side's response turns only."""
    prompt = example["prompt"]
    row = {}
    for side in SIDES:
        ids, labels = encode_chat(prompt + example[side], tokenizer, from_turn=len(prompt))
        row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labels
    row["margin"] = example.get("margin") or 0.0
    return row


def pair_length(row: dict) -> int:
    return max(len(row[f"{side}_input_ids"]) for side in SIDES)


def truncate_pair(row: dict, max_len: int) -> dict:
    return {key: value[:max_len] if isinstance(value, list) else value for key, value in row.items()}


def has_both_responses(row: dict) -> bool:
    return all(any(label != IGNORE for label in row[f"{side}_labels"]) for side in SIDES)


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of 2P sequences: rows 0..P-1 the chosen sides, P..2P-1 the rejected ones, right-padded to
    the longest of all, with an attention mask. `row_index` says which prepared row each pair came from
    (the reference log-prob cache is indexed by it); `margin` is the per-pair reward-model margin."""
    sequences = [(row[f"{side}_input_ids"], row[f"{side}_labels"]) for side in SIDES for row in rows]
    width = max(len(ids) for ids, _ in sequences)
    input_ids, labels, attention = [], [], []
    for ids, labs in sequences:
        pad = width - len(ids)
        input_ids.append(list(ids) + [pad_id] * pad)
        labels.append(list(labs) + [IGNORE] * pad)
        attention.append([1] * len(ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
        "margin": torch.tensor([row["margin"] for row in rows], dtype=torch.float32),
        "row_index": torch.tensor([row["row_index"] for row in rows], dtype=torch.long),
        "num_examples": torch.tensor(len(rows)),
        "num_tokens": torch.tensor(sum(len(ids) for ids, _ in sequences)),
    }
