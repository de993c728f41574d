"""Log-probabilities of given tokens under a causal LM: per token (RL) and summed per sequence (DPO)."""

from __future__ import annotations

import torch

from ftcluster.data.collate import model_inputs
from ftcluster.data.template import IGNORE
from ftcluster.objectives import chunked
from ftcluster.objectives.cross_entropy import at_label_positions, next_token_targets
from ftcluster.objectives.losses import SequenceLogps
from ftcluster.util import dist


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[:, t] | ...) from logits[:, t] (already aligned: logits predict the targets), in fp32.

    logit - logsumexp(logits) never materialises the [batch, tokens, vocab] log-softmax."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def model_labelled_logps(model, batch: dict, temperature: float = 1.0,
                         chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over `batch`: [batch, length - 1] log-probs of its labels (0 where unlabelled) and the
    label mask. From the labelled positions' hidden states where the family is known, as token_loss_sum."""
    inputs = model_inputs(batch, dist.device())
    labels = batch["labels"]
    head = chunked.head_of(model)
    if head is not None:
        hidden = chunked.final_hidden(model, inputs, head)
        return chunked.labelled_logps(at_label_positions(hidden, labels), labels, head, chunk_tokens, temperature)
    logits = model(**inputs, use_cache=False).logits
    labels = labels.to(logits.device)
    # Every position scored against its next-token target, and the last column of the [rows, positions] result
    # dropped (its target is IGNORE), rather than slicing the logits.
    targets = next_token_targets(labels)
    mask = targets != IGNORE
    logps = token_logps(at_label_positions(logits, labels), targets, temperature) * mask
    return logps[:, :-1], mask[:, :-1]


def pair_logps(model, batch: dict, chunk_tokens: int = 0) -> SequenceLogps:
    """One forward over a pair batch (chosen rows first, then rejected; ftcluster.data.pairs) and each
    side's summed response log-probability and token count."""
    logps, mask = model_labelled_logps(model, batch, chunk_tokens=chunk_tokens)
    sums, counts = logps.sum(dim=1), mask.sum(dim=1)
    pairs = sums.shape[0] // 2
    return SequenceLogps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:])
