"""Group relative policy optimisation (DeepSeekMath): several sampled answers per prompt, each one's
advantage its reward relative to its group's, no critic.

Features and their trade-offs:
- Roles on Ray actors (ftcluster.rl.context): the policy group samples (or stage.rl.rollout_workers
  separate rollout actors do, synced after every update) and trains; the reference is the policy with
  its LoRA adapters disabled, a frozen copy the policy holds, or its own group
  (stage.rl.reference_workers); the reward is a Python function run here or a reward-model group.
- Advantages: (r - mean of the group) / (std of the group) per prompt (stage.rl.scale_rewards=false
  keeps only the centring, as Dr. GRPO argues); a group whose answers all scored alike teaches nothing,
  and the share of groups with a signal is logged.
- KL to the reference as a loss term (k3 estimator, always >= 0) by default; stage.rl.kl_mode=reward
  subtracts it from the reward instead. kl_coef=0 needs no reference at all.
- The clipped surrogate (PPO's) over every response token of a mini-batch, normalised by the
  mini-batch's response tokens (long answers weigh per token, not per answer); with one update per
  rollout the ratio is 1 and the clip inactive, as in GRPO's on-policy form.
- Metrics per step: reward mean / std / min / max, response length, KL, clip fraction, the phase
  timings (generate, score, logprobs, train, sync) and held-out mean reward (plus exact match when
  the prompts carry reference answers) on the eval schedule.
"""

from __future__ import annotations

import time

import torch

from ftcluster.objectives.advantages import group_relative
from ftcluster.objectives.losses import kl_penalty
from ftcluster.rl.context import RLContext
from ftcluster.rl.experience import rollout_metrics


def train(ctx: RLContext) -> None:
    rl = ctx.cfg.stage.rl
    ctx.before_training()
    for step in range(ctx.start_step, ctx.cfg.trainer.max_steps):
        started, lr = time.perf_counter(), ctx.policy_lr()
        samples = ctx.rollout(step)
        rewards = torch.tensor(ctx.score(samples, step), dtype=torch.float32)
        # With one pass over one mini-batch the update's forward pass gives the policy's log-probs (ratio 1).
        old, ref = ctx.logprobs(samples, policy=not ctx.update_gives_old_logps())
        shaped = rewards
        if rl.kl_mode == "reward" and ref is not None:
            shaped = rewards - rl.kl_coef * torch.stack([kl.sum() for kl in _kl(old, ref, rl.kl_estimator)])
        advantages = group_relative(shaped, rl.samples_per_prompt, rl.scale_rewards)
        for i, sample in enumerate(samples):
            if old is not None:
                sample["old_logps"] = old[i]
            sample["ref_logps"] = ref[i] if ref is not None else []
            sample["advantages"] = [float(advantages[i])] * len(sample["response_ids"])
        keys = ("ref_logps", "advantages", *(("old_logps",) if old is not None else ()))
        stats = ctx.update("policy", samples, keys)
        if old is None:
            old = stats.pop("logps")
            ctx.against_sampler(samples, old)
        kl_per_sample = _kl(old, ref, rl.kl_estimator) if ref is not None else None
        ctx.sync(step + 1)
        metrics = rollout_metrics(samples, rewards, kl_per_sample, rl.samples_per_prompt)
        metrics.update(loss=stats["policy_loss"] / stats["tokens"], clip_fraction=stats["clipped"] / stats["tokens"],
                       lr=lr, step_time_s=time.perf_counter() - started)
        metrics["generated_tokens_per_s"] = metrics["response_length"] * len(samples) / metrics["step_time_s"]
        if not ctx.end_step(step + 1, metrics, samples, rewards.tolist()):
            return
    ctx.export_final()


def _kl(old: list[list[float]], ref: list[list[float]], estimator: str) -> list[torch.Tensor]:
    """Per-token KL estimates of each sample's policy log-probs against the reference's."""
    return [kl_penalty(torch.tensor(o), torch.tensor(r), estimator) for o, r in zip(old, ref)]
