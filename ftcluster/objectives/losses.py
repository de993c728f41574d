"""Training objectives beyond next-token cross-entropy: the reward-model, DPO-family and PPO losses.

Pure functions of tensors, so each is checked against hand-computed values (tests/test_losses.py).
Every function works on per-sequence (or per-token) terms and leaves the normalisation to the caller:
stages divide sums by counts over the whole global batch, so micro-batch size and world size never
change the objective.

Sequence log-probabilities come as sums over a response's tokens plus the token count; losses that
want a length-normalised log-probability (IPO, SimPO, ORPO) divide by the count themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# DPO family: which ones need a reference model, and what each needs from the config.
PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-pair reward-model loss -log sigmoid(r_chosen - r_rejected - margin) (Llama 2's margin variant)."""
    return -F.logsigmoid(chosen - rejected - margin)


@dataclass
class SequenceLogps:
    """Summed log-probabilities of the chosen and rejected responses, and their token counts, per pair."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


@dataclass
class PreferenceTerms:
    """Per-pair terms of a DPO-family objective.

    The objective over a global batch of P pairs with N chosen tokens is
    `losses.sum() / P + nll.sum() / N`: `nll` is the (weighted) SFT term on the chosen side, ORPO's own
    and RPO's (any loss with sft_weight > 0), else zero.
    Rewards are the implicit rewards each loss defines, for the metrics (accuracy, margins)."""

    losses: torch.Tensor
    nll: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_terms(loss: str, policy: SequenceLogps, reference: SequenceLogps | None, beta: float,
                     label_smoothing: float = 0.0, simpo_gamma: float = 0.5, sft_weight: float = 0.0) -> PreferenceTerms:
    """The per-pair terms of one DPO-family loss, as TRL defines them.

    sigmoid: DPO, -log sigmoid(beta * h) with h the difference of the policy's and the reference's
      chosen-minus-rejected log-ratios; with label_smoothing e > 0 it is conservative DPO (cDPO):
      -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
    ipo: (h - 1 / (2 beta))^2 on length-normalised log-probs.
    simpo (reference-free): -log sigmoid(beta (avg_c - avg_r) - gamma).
    orpo (reference-free): NLL of the chosen side plus beta * -log sigmoid(log-odds ratio), on
      length-normalised log-probs.
    sft_weight > 0 adds that weight times the chosen side's NLL (RPO, TRL's rpo_alpha): it keeps the
    chosen answers likely while the margin grows, against DPO's tendency to lower both sides.
    """
    nll = -sft_weight * policy.chosen
    if loss in ("sigmoid", "ipo"):
        if reference is None:
            raise ValueError(f"loss {loss!r} needs reference log-probs")
        if loss == "sigmoid":
            chosen_ratio, rejected_ratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
            h = chosen_ratio - rejected_ratio
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        else:
            (pc, pr), (rc, rr) = policy.averages(), reference.averages()
            chosen_ratio, rejected_ratio = pc - rc, pr - rr
            losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
        return PreferenceTerms(losses, nll, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    avg_c, avg_r = policy.averages()
    if loss == "simpo":
        h = beta * (avg_c - avg_r) - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
        return PreferenceTerms(losses, nll, beta * avg_c.detach(), beta * avg_r.detach())
    if loss == "orpo":
        # log(p / (1 - p)) of the average per-token probability; log1p(-exp(x)) is exact for x < 0.
        log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
        losses = -beta * F.logsigmoid(log_odds)
        return PreferenceTerms(losses, nll - policy.chosen, beta * avg_c.detach(), beta * avg_r.detach())
    raise ValueError(f"unknown preference loss {loss!r}; known: {', '.join(PREFERENCE_LOSSES)}")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1, k2, k3).

    k1 = log r is unbiased but noisy and can be negative; k3 = r' - 1 - log r' with r' = p_ref / p is
    unbiased and always >= 0 (what GRPO uses as a loss); k2 = (log r)^2 / 2 is biased, low-variance.
    """
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k2, k3")


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate -min(r A, clip(r, 1 - eps, 1 + eps) A) and whether the clip was active."""
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_eps: float) -> torch.Tensor:
    """Per-token clipped value loss max((v - R)^2, (v_clip - R)^2) / 2, v_clip within eps of the old value."""
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def pair_wins(margins: torch.Tensor) -> torch.Tensor:
    """Pairs ranked right, a tie counting half: chance is 0.5 (a policy equal to its reference ties on
    every pair; counting ties as losses, as TRL does, would start its accuracy at 0)."""
    return (margins > 0).sum() + 0.5 * (margins == 0).sum()
