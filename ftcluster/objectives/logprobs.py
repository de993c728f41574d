"""Log-probabilities of given tokens under a causal LM: per token (RL) and summed per sequence (DPO)."""

from __future__ import annotations

import torch

from ftcluster.util import dist
from ftcluster.data.template import IGNORE
from ftcluster.objectives.losses import SequenceLogps


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[:, t] | ...) from logits[:, t] (already aligned: logits predict the targets), in fp32.

    logit - logsumexp(logits) never materialises the [batch, tokens, vocab] log-softmax."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def labelled_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labelled positions (next-token shift applied) and their mask."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return token_logps(logits[:, :-1], targets) * mask, mask


def pair_logps(model, batch: dict) -> SequenceLogps:
    """One forward over a pair batch (chosen rows first, then rejected; ftcluster.data.pairs) and each
    side's summed response log-probability and token count."""
    inputs = {k: batch[k].to(dist.device()) for k in ("input_ids", "attention_mask")}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"].to(logits.device)
    logps, mask = labelled_logps(logits[:, -labels.shape[1]:], labels)
    sums, counts = logps.sum(dim=1), mask.sum(dim=1)
    pairs = sums.shape[0] // 2
    return SequenceLogps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:])
