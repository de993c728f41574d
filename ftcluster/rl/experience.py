"""Rollouts as tensors: prompt + response sequences right-padded into one batch, and per-token values
(log-probs, advantages) moved between the batch layout and plain per-sample lists.

Per-sample lists are what travels between the controller and the role actors (small, and independent
of each group's padding); a group pads its own share. A sequence's response token t sits at column
len(prompt) + t of the batch, and its log-prob (or value) at column len(prompt) + t - 1 of the shifted
[batch, tokens - 1] layout: the position that predicts it. Also the metrics of a rollout, which both RL
stages log.
"""

from __future__ import annotations

import torch

from ftcluster.data.template import IGNORE


def pad_sequences(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """samples: [{"prompt_ids", "response_ids"}, ...] -> input_ids, attention_mask and labels (the
    response tokens; IGNORE on prompt and padding)."""
    width = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)
    input_ids, attention, labels = [], [], []
    for s in samples:
        ids = list(s["prompt_ids"]) + list(s["response_ids"])
        pad = width - len(ids)
        input_ids.append(ids + [pad_id] * pad)
        attention.append([1] * len(ids) + [0] * pad)
        labels.append([IGNORE] * len(s["prompt_ids"]) + list(s["response_ids"]) + [IGNORE] * pad)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """The [batch, tokens - 1] mask of positions that predict a response token."""
    return labels[:, 1:] != IGNORE


def to_lists(values: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """Per-sample lists of the masked entries of a [batch, tokens - 1] tensor, in order."""
    return [row[m].tolist() for row, m in zip(values.detach().float().cpu(), mask.cpu())]


def from_lists(lists: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """The inverse of to_lists: a [batch, tokens - 1] float tensor, zero off the mask."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, values in enumerate(lists):
        out[i, mask[i]] = torch.tensor(values, dtype=torch.float32)
    return out


def shares(items: list, parts: int) -> list[list]:
    """`items` in `parts` contiguous equal shares (the caller checks that they divide)."""
    size = len(items) // parts
    return [items[i * size:(i + 1) * size] for i in range(parts)]


def rollout_metrics(samples: list[dict], rewards: torch.Tensor, kl: list | None, group_size: int) -> dict:
    """What a step's rollout says, for the RL stages' metrics: rewards, response length, the share of prompt
    groups whose answers scored differently (the ones GRPO learns from) and the mean per-token KL."""
    groups = rewards.view(-1, group_size)
    metrics = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
               "reward_min": rewards.min().item(), "reward_max": rewards.max().item(),
               "response_length": sum(len(s["response_ids"]) for s in samples) / len(samples),
               "groups_with_signal": (groups.std(dim=1) > 0).float().mean().item() if group_size > 1 else 1.0}
    if kl is not None:
        tokens = sum(len(k) for k in kl)
        metrics["kl"] = sum(k.sum().item() for k in kl) / max(tokens, 1)
    return metrics


def sampler_mismatch(sampler: list[list[float]], trainer: list[list[float]]) -> dict:
    """Per-token log-prob differences between the engine that sampled and the trainer's forward pass, over
    all response tokens: the mean and largest |difference|, and the KL(sampler || trainer) estimate
    mean(log p_sampler - log p_trainer) on the sampled tokens."""
    diff = torch.tensor([s - t for rs, rt in zip(sampler, trainer) for s, t in zip(rs, rt)], dtype=torch.float64)
    if not len(diff):
        return {}
    return {"sampler_logp_diff": diff.abs().mean().item(), "sampler_logp_diff_max": diff.abs().max().item(),
            "sampler_kl": diff.mean().item()}


def truncated_is_weights(sampler: list[list[float]], trainer: list[list[float]], cap: float
                         ) -> tuple[list[list[float]], float]:
    """Truncated importance sampling: per token min(p_trainer / p_sampler, cap), and the share of tokens the
    cap cut."""
    weights, capped, total = [], 0, 0
    for rs, rt in zip(sampler, trainer):
        ratio = torch.exp(torch.tensor(rt, dtype=torch.float64) - torch.tensor(rs, dtype=torch.float64))
        capped += int((ratio > cap).sum())
        total += len(ratio)
        weights.append(ratio.clamp(max=cap).tolist())
    return weights, capped / max(total, 1)
