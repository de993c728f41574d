"""Proximal policy optimisation with a learned critic (InstructGPT's RLHF recipe).

Features and their trade-offs:
- Roles on Ray actors (ftcluster.rl.context): policy, critic (a value head on the reward model's
  backbone when stage.rl.reward_model is set, else on the policy's), reference and reward model, each
  its own DeepSpeed group, colocated on shared bundles or apart (stage.rl.colocate).
- Rewards: the sequence's score on its last token, minus kl_coef x the per-token KL estimate (k1)
  against the reference on every token (stage.rl.kl_mode=reward, the default); kl_mode=loss moves the
  KL into the policy loss instead.
- Advantages by GAE (stage.rl.gamma, stage.rl.lam) on the critic's values, whitened over the rollout;
  the critic's targets are the returns, with a clipped value loss (stage.rl.value_clip).
- stage.rl.updates_per_rollout passes of mini-batches of trainer.global_batch sequences, each an
  optimizer step of the policy and of the critic; the clipped surrogate keeps later passes close to
  the sampling policy.
- Metrics as GRPO's (reward, KL, clip fraction, phase timings, held-out reward) plus value loss.
"""

from __future__ import annotations

import time

import torch

from ftcluster.objectives.advantages import gae, sequence_rewards_to_tokens, whiten
from ftcluster.objectives.losses import kl_penalty
from ftcluster.rl.context import RLContext
from ftcluster.rl.experience import rollout_metrics


def train(ctx: RLContext) -> None:
    rl = ctx.cfg.stage.rl
    ctx.before_training()
    for step in range(ctx.start_step, ctx.cfg.trainer.max_steps):
        started, lr = time.perf_counter(), ctx.policy_lr()
        samples = ctx.rollout(step)
        scores = torch.tensor(ctx.score(samples, step), dtype=torch.float32)
        old, ref = ctx.logprobs(samples)
        values = ctx.values(samples)

        mask = _padded_mask(samples)
        token_rewards = sequence_rewards_to_tokens(scores, mask)
        kl = None
        if ref is not None:
            kl = [kl_penalty(torch.tensor(o), torch.tensor(r), rl.kl_estimator) for o, r in zip(old, ref)]
            if rl.kl_mode == "reward":
                token_rewards = token_rewards - rl.kl_coef * _padded(kl, mask)
        advantages, returns = gae(token_rewards, _padded(values, mask), mask, rl.gamma, rl.lam)
        advantages = whiten(advantages, mask)
        for i, sample in enumerate(samples):
            n = len(sample["response_ids"])
            sample.update(old_logps=old[i], ref_logps=ref[i] if ref is not None else [], old_values=values[i],
                          advantages=advantages[i, :n].tolist(), returns=returns[i, :n].tolist())
        policy_stats = ctx.update("policy", samples, ("old_logps", "ref_logps", "advantages"))
        critic_stats = ctx.update("critic", samples, ("old_values", "returns"))
        ctx.sync(step + 1)

        metrics = rollout_metrics(samples, scores, kl, 1)
        del metrics["groups_with_signal"]
        metrics.update(loss=policy_stats["policy_loss"] / policy_stats["tokens"],
                       clip_fraction=policy_stats["clipped"] / policy_stats["tokens"],
                       value_loss=critic_stats["value_loss"] / critic_stats["tokens"],
                       value_mean=float(_padded(values, mask).sum() / mask.sum()), lr=lr,
                       step_time_s=time.perf_counter() - started)
        if not ctx.end_step(step + 1, metrics, samples, scores.tolist()):
            return
    ctx.export_final()


def _padded_mask(samples: list[dict]) -> torch.Tensor:
    width = max(len(s["response_ids"]) for s in samples)
    return torch.tensor([[t < len(s["response_ids"]) for t in range(width)] for s in samples])


def _padded(rows: list, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for i, row in enumerate(rows):
        values = torch.as_tensor(row, dtype=torch.float32)
        out[i, :len(values)] = values
    return out
