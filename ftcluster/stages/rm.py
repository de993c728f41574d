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
from ftcluster.data.loader import eval_batches
from ftcluster.train.engine import optimizer_step
from ftcluster.objectives.losses import bradley_terry, pair_wins
from ftcluster.train import loop
from ftcluster.stages.context import StageContext

MODEL_KIND = "reward"
_SUMS = ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected")


def train(ctx: StageContext) -> None:
    loop.run(ctx, step, evaluate)


def step(ctx: StageContext, index: int) -> loop.StepResult:
    micro_batches = ctx.loader.micro_batches(index)
    pairs, tokens = dist.all_reduce_sum([sum(int(mb["num_examples"]) for mb in micro_batches),
                                         sum(int(mb["num_tokens"]) for mb in micro_batches)]).tolist()
    sums = torch.zeros(len(_SUMS), dtype=torch.float64)
    for mb in micro_batches:
        chosen, rejected = scores(ctx.engine, mb)
        losses = bradley_terry(chosen, rejected, mb["margin"].to(chosen.device) + ctx.cfg.stage.rm.margin)
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


def _pair_sums(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    margin = (chosen - rejected).detach()
    return torch.stack([losses.detach().sum(), pair_wins(margin), margin.sum(), chosen.detach().sum(),
                        rejected.detach().sum()]).double().cpu()


@torch.no_grad()
def evaluate(ctx: StageContext, step: int, generate: bool) -> None:
    if ctx.eval_rows is None:
        return
    ctx.engine.eval()
    sums, pairs = torch.zeros(len(_SUMS), dtype=torch.float64), 0
    for batch in eval_batches(ctx.eval_rows, ctx.cfg.trainer.micro_batch_per_device, ctx.rank, ctx.world_size,
                              ctx.pad_id, packed=False):
        chosen, rejected = scores(ctx.engine, batch)  # fillers too: ZeRO-3 forwards are collectives
        if int(batch["num_examples"]) == 0:
            continue
        losses = bradley_terry(chosen, rejected, batch["margin"] + ctx.cfg.stage.rm.margin)
        sums += _pair_sums(losses, chosen, rejected)
        pairs += int(batch["num_examples"])
    ctx.engine.train()
    totals = dist.all_reduce_sum([*sums.tolist(), pairs])
    values = (totals[:-1] / max(totals[-1].item(), 1)).tolist()
    ctx.tracker.log(step, {f"eval_{name}": value for name, value in zip(_SUMS, values)})
