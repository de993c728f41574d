"""Rows into model inputs: packed micro-batches flattened into one row, unpacked ones right-padded.

Packed (data.packing=true): the micro-batch's rows are laid end to end as one row `[1, ΣL]`, with no padding
at all. What keeps the examples apart is said twice, for the two kinds of attention:
- `cu_seq_lens_q`/`cu_seq_lens_k` (int32, `[0, end of example 1, ..., ΣL]`) and `max_length_q`/`max_length_k`
  (Python ints): the names and types of transformers' `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`.
  A causal LM passes them through its forward's **kwargs to the attention function: flash_attention_2 runs
  its varlen kernel on them, and ftcluster.train.attention's per-example sdpa loops over them. Neither
  builds an `[L, L]` mask, and flash-attention no longer has to infer boundaries (which it does only at
  batch size 1, with a device sync in every layer).
- `position_ids` restarting at 0 per example: rotary positions, and what eager (and plain sdpa) attention
  turns into a block-diagonal causal mask when the kwargs above are not forwarded.
The model must run with `use_cache=False`: with a cache, transformers skips that detection.

Unpacked: rows right-padded to the longest, with an `attention_mask` and no `position_ids`: the model's own,
0..width-1 on every row, are the same positions, and given explicitly as a `[rows, width]` tensor they cost the
rotary embedding a row of cos/sin per example (3-5% of a tiny model's step, measured side by side). Preference
pairs (collate_pairs): both sides of every pair in one padded batch, chosen first.

Every batch also counts its work for throughput metrics: `num_examples` and `num_tokens` (real tokens,
padding excluded), as 0-d tensors.
"""

from __future__ import annotations

import torch

from ftcluster.data.pairs import SIDES
from ftcluster.data.template import IGNORE

# What the model's forward takes from a batch (`labels` stay out: the losses score them in fp32 themselves).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids",
                    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def collate(rows: list[dict], pad_id: int, packed: bool) -> dict:
    """Packed rows flattened into one row with example boundaries; unpacked rows padded (see the module doc)."""
    return flatten(rows) if packed else pad(rows, pad_id)


def flatten(rows: list[dict]) -> dict:
    """The packed rows as one `[1, ΣL]` row; its examples, and their positions from 0, from each row's
    example_lengths."""
    input_ids, labels, position_ids, starts = [], [], [], []
    for row in rows:
        for length in row["example_lengths"]:
            starts.append(len(position_ids))
            position_ids += range(length)
        input_ids += row["input_ids"]
        labels += row["labels"]
    for start in starts:
        # The first token of an example is never a target (packing.py writes its rows so): after flattening,
        # the previous example's last token would otherwise learn to predict it.
        labels[start] = IGNORE
    cu_seq_lens = starts + [len(input_ids)]
    max_length = max(b - a for a, b in zip(cu_seq_lens, cu_seq_lens[1:]))
    bounds = torch.tensor(cu_seq_lens, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        # One tensor for both: query and key boundaries coincide in self-attention.
        "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
        # Python ints, as flash_attn_varlen_func wants them: a tensor would cost a device sync per layer.
        "max_length_q": max_length, "max_length_k": max_length,
        "num_examples": torch.tensor(sum(row["num_examples"] for row in rows)),
        "num_tokens": torch.tensor(len(input_ids)),
    }


def pad(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows right-padded to the longest, with an attention_mask (positions: the model's own, from 0 per row)."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for row in rows:
        n = len(row["input_ids"])
        padding = width - n
        batch["input_ids"].append(list(row["input_ids"]) + [pad_id] * padding)
        batch["labels"].append(list(row["labels"]) + [IGNORE] * padding)
        batch["attention_mask"].append([1] * n + [0] * padding)
    batch["num_examples"] = sum(row["num_examples"] for row in rows)
    batch["num_tokens"] = sum(len(row["input_ids"]) for row in rows)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


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


def model_inputs(batch: dict, device: torch.device | str) -> dict:
    """The batch's model-forward keys on `device`: tensors moved, the Python-int max lengths as they are."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items() if key in MODEL_INPUT_KEYS}
