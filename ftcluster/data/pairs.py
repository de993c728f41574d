"""Preference pairs as prepared rows: one row per pair, both sides' ids and labels (collate.collate_pairs
batches them into one concatenated forward of the chosen and the rejected responses).

Labels mark the response tokens only (the prompt is shared and carries no preference), so a side's
sequence log-probability is the sum over its labelled tokens.
"""

from __future__ import annotations

from ftcluster.data.template import IGNORE, encode_chat

SIDES = ("chosen", "rejected")


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
