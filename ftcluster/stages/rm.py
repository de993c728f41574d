"""Reward modelling: a scalar score per sequence, trained so that chosen responses outscore rejected ones.

Features and their trade-offs:
- The model is AutoModelForSequenceClassification with one output on the backbone: a new linear head
  on a causal LM (its score at the last non-padding token, transformers' rule) or an encoder
  classifier. final/ loads the same way and scores a conversation rendered with final/'s chat template
  (ftcluster.rewards.RewardModel does exactly that for the RL stages).
- Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - m), m = stage.rm.margin plus a record's own
  `margin` field (Llama 2's margin for pairs rated far apart). The mean over every pair of the global
  batch, whatever the world size.
- Chosen and rejected sides go through one forward (rows of the same padded batch).
- With LoRA the head trains in full beside the adapters (peft's SEQ_CLS task).
- Metrics per step and on the held-out pairs: accuracy (share of pairs ranked right), mean margin
  r_chosen - r_rejected, mean chosen and rejected rewards.
"""

from __future__ import annotations

import torch

from ftcluster.util import dist
from ftcluster.train.engine import optimizer_step
from ftcluster.objectives.losses import bradley_terry, pair_wins
from ftcluster.train import loop
from ftcluster.train.context import StageContext
from ftcluster.train.evaluation import held_out

_SUMS = ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected")


def train(ctx: StageContext) -> None:
    for step in loop.steps(ctx, evaluate):
        step.result = train_step(ctx, step.index)


def train_step(ctx: StageContext, index: int) -> loop.StepResult:
    micro_batches = ctx.loader.micro_batches(index)
    pairs, tokens = dist.all_reduce_sum([sum(int(mb["num_examples"]) for mb in micro_batches),
                                         sum(int(mb["num_tokens"]) for mb in micro_batches)]).tolist()
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=dist.device())  # read back once, at the end
    for mb in micro_batches:
        chosen, rejected = scores(ctx.engine, mb)
        losses = bradley_terry(chosen, rejected, _margins(ctx, mb, chosen.device))
        ctx.engine.backward(losses.sum() / pairs * ctx.world_size, scale_wrt_gas=False)
        optimizer_step(ctx.engine)
        sums += _pair_sums(losses, chosen, rejected)
    metrics = dict(zip(_SUMS, (dist.all_reduce_sum(sums) / pairs).tolist()))
    return loop.StepResult(metrics, tokens, tokens, pairs)


def scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected sides of a pair batch, from one forward, in fp32."""
    rewards = model(input_ids=batch["input_ids"].to(dist.device()),
                    attention_mask=batch["attention_mask"].to(dist.device())).logits.squeeze(-1).float()
    pairs = rewards.shape[0] // 2
    return rewards[:pairs], rewards[pairs:]


def _margins(ctx: StageContext, batch: dict, device: torch.device) -> torch.Tensor:
    """Each pair's margin m: the record's own (a column of the batch, on the host) plus stage.rm.margin."""
    return batch["margin"].to(device, non_blocking=True) + ctx.cfg.stage.rm.margin


def _pair_sums(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The _SUMS of one batch, on the device the rewards are on."""
    margin = (chosen - rejected).detach()
    return torch.stack([losses.detach().sum(), pair_wins(margin), margin.sum(), chosen.detach().sum(),
                        rejected.detach().sum()]).double()


@torch.no_grad()
def evaluate(ctx: StageContext, step: int, generate: bool) -> None:
    if ctx.eval_rows is None:
        return

    def score(batch: dict) -> dict:
        chosen, rejected = scores(ctx.engine, batch)
        losses = bradley_terry(chosen, rejected, _margins(ctx, batch, chosen.device))
        return {**dict(zip(_SUMS, _pair_sums(losses, chosen, rejected))), "pairs": int(batch["num_examples"])}

    totals = held_out(ctx, (*_SUMS, "pairs"), score)
    pairs = max(totals.pop("pairs"), 1)
    ctx.tracker.log(step, {f"eval_{name}": value / pairs for name, value in totals.items()})
