"""Advantages for the RL stages: GAE for PPO, group-relative for GRPO. Pure functions of tensors.

Responses are right-padded rows of shape [batch, tokens] with a mask of their real tokens; a reward
arrives per sequence and lands on its last real token.
"""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's real tokens: (advantages, returns).

    delta_t = r_t + gamma v_{t+1} - v_t and A_t = delta_t + gamma lam A_{t+1}, with v and A zero past
    the last real token; returns = A + v (the critic's targets).
    """
    rewards, values, mask = rewards * mask, values * mask, mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (PPO's advantage normalisation)."""
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask


def group_relative(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean, over the group's standard deviation when `scale`.

    `rewards` holds consecutive groups of `group_size` samples of one prompt each. The standard
    deviation is the unbiased one (torch's default), as in DeepSeekMath; a group whose samples all
    scored the same gets zero advantage.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def sequence_rewards_to_tokens(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A [batch, tokens] tensor holding each sequence's reward on its last real token, zero elsewhere."""
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if mask.shape[1] == 0:
        return out
    lengths = mask.sum(dim=1).long().to(rewards.device)
    # A scatter rather than boolean indexing: no data-dependent shapes, so no device sync. An empty response
    # scatters a zero onto its first column.
    last = (lengths - 1).clamp(min=0).unsqueeze(1)
    return out.scatter(1, last, torch.where(lengths > 0, rewards, 0).unsqueeze(1).to(rewards.dtype))
