"""Next-token cross-entropy over label positions: SFT's loss, and every loss-per-token evaluation (the SPMD
stages' eval_loss and `ftcluster eval`'s perplexity), so that all of them measure the same thing.

Sums, never means: callers divide by label tokens counted over the whole global batch or eval set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftcluster.data.collate import model_inputs
from ftcluster.data.template import IGNORE
from ftcluster.objectives import chunked
from ftcluster.util import dist


def token_loss_sum(model, batch: dict, chunk_tokens: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over label positions, in fp32.

    From the final hidden states at the labelled positions only (ftcluster.objectives.chunked), for model
    families it knows: in one piece with chunk_tokens=0, else that many label tokens at a time, recomputed in
    backward. Other families take the model's full logits."""
    inputs = model_inputs(batch, dist.device())
    labels = batch["labels"]
    head = chunked.head_of(model)
    if head is not None:
        hidden = chunked.final_hidden(model, inputs, head)
        return chunked.loss_sum(at_label_positions(hidden, labels), labels, head, chunk_tokens)
    # use_cache=False is what makes transformers honour packed position_ids (no cross-example attention).
    logits = model(**inputs, use_cache=False).logits
    labels = labels.to(logits.device)
    logits = at_label_positions(logits, labels)
    targets = next_token_targets(labels)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """What each position predicts: the labels shifted left, IGNORE after the last. Shifting the labels rather
    than slicing the logits keeps the logits whole: a slice would be copied by flatten ([rows x tokens x vocab]
    floats, where the labels' copy is a row of integers) and zero-filled again in its backward."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def at_label_positions(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's per-position outputs ([rows, positions, ...]) at the labels' positions: the last
    labels.shape[1], since prompt tuning prepends virtual tokens. The outputs themselves when nothing was
    prepended: the backward of a slice writes a zero-filled copy of the whole tensor, here the logits
    (1 ms of a 26 ms forward and backward on the tiny model, more at a 49k vocabulary)."""
    if outputs.shape[1] == labels.shape[1]:
        return outputs
    return outputs[:, -labels.shape[1]:]


def label_tokens(batch: dict, rows: int | None = None) -> int:
    """Positions token_loss_sum scores (labels after the next-token shift), over the first `rows` rows or all."""
    return int((batch["labels"][:rows, 1:] != IGNORE).sum())
