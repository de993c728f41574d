"""Direct preference optimisation and its family: DPO (sigmoid), conservative DPO (sigmoid with
label_smoothing), IPO, and the reference-free SimPO and ORPO (ftcluster.objectives.losses.preference_terms).

Features and their trade-offs:
- One forward per micro-batch: the chosen and rejected sides are rows of the same padded batch
  (ftcluster.data.pairs), so ZeRO-3 gathers every layer once per pair batch, not twice.
- The reference (sigmoid, ipo): by default its log-probs are computed once before training and cached
  on disk (ftcluster.train.reference), keyed by model, data and template; later epochs, resumed attempts and
  other runs on the same model and data do no reference forward at all, and no reference model is in
  memory while training. stage.dpo.reference=live runs the reference every step instead: no cache on
  disk, one more forward per micro-batch, and (full fine-tuning) a frozen copy kept in memory. With
  LoRA/DoRA the reference is the policy with its adapters disabled, never a second copy.
- The objective is the mean over every pair of the global batch (plus, for ORPO, the NLL of the chosen
  responses over all their tokens): world size and micro-batch size do not change it.
- Metrics per step and on the held-out pairs: the implicit rewards of chosen and rejected responses,
  their margin and the accuracy (the share of pairs whose chosen reward is higher), and the policy's
  log-probs; with trainer.eval_generate, greedy exact match on the held-out prompts against the chosen
  answers.
"""

from __future__ import annotations

import time

import torch

from ftcluster.util import dist
from ftcluster.train.engine import optimizer_step
from ftcluster.eval.generate import eval_generation
from ftcluster.objectives.cross_entropy import label_tokens
from ftcluster.objectives.logprobs import pair_logps
from ftcluster.objectives.losses import REFERENCE_FREE, pair_wins, preference_terms
from ftcluster.train.reference import ReferenceLogps
from ftcluster.train import loop
from ftcluster.train.context import StageContext
from ftcluster.train.evaluation import held_out

# Summed over the pairs of a global batch (across ranks), then divided by the number of pairs.
_SUMS = ("loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "logps_chosen",
         "logps_rejected")


def train(ctx: StageContext) -> None:
    d = ctx.cfg.stage.dpo
    reference = None
    if d.loss not in REFERENCE_FREE:
        started = time.perf_counter()
        reference = ReferenceLogps(ctx, cached=d.reference == "cached")
        if reference.cached:
            ctx.tracker.log(0, {"reference_cache_hit": int(reference.cache_hit),
                                "reference_forward_batches": reference.forward_batches,
                                "reference_pass_s": time.perf_counter() - started})
            ctx.tracker.message(f"reference log-probs {'read from' if reference.cache_hit else 'cached in'} "
                                f"{reference.folder} ({reference.forward_batches} reference forward batches)")
    for step in loop.steps(ctx, lambda c, s, g: evaluate(c, s, g, reference)):
        step.result = train_step(ctx, step.index, reference)


def train_step(ctx: StageContext, index: int, reference: ReferenceLogps | None) -> loop.StepResult:
    engine, d = ctx.engine, ctx.cfg.stage.dpo
    micro_batches = ctx.loader.micro_batches(index)
    pairs, chosen_tokens, tokens = dist.all_reduce_sum([
        sum(int(mb["num_examples"]) for mb in micro_batches),
        sum(_chosen_tokens(mb) for mb in micro_batches),
        sum(int(mb["num_tokens"]) for mb in micro_batches)]).tolist()
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=dist.device())  # read back once, at the end
    for mb in micro_batches:
        policy = pair_logps(engine, mb, ctx.cfg.trainer.loss_chunk_tokens)
        terms = preference_terms(d.loss, policy, reference.logps(mb) if reference else None, d.beta,
                                 d.label_smoothing, d.simpo_gamma, d.sft_weight)
        objective = terms.losses.sum() / pairs + terms.nll.sum() / chosen_tokens
        # DeepSpeed averages gradients over ranks: scale so the sum over ranks is the global objective.
        engine.backward(objective * ctx.world_size, scale_wrt_gas=False)
        optimizer_step(engine)
        sums += _pair_sums(terms, policy, objective.detach() * pairs)
    sums = dist.all_reduce_sum(sums) / pairs
    metrics = dict(zip(_SUMS, sums.tolist()))
    if reference is not None and not reference.cached:
        metrics["reference_forward_batches"] = reference.forward_batches
    return loop.StepResult(metrics, tokens, chosen_tokens, pairs)


def _pair_sums(terms, policy, loss_sum: torch.Tensor) -> torch.Tensor:
    """The _SUMS of one batch, on the device the log-probs are on."""
    margin = terms.chosen_rewards - terms.rejected_rewards
    return torch.stack([loss_sum.double(), terms.chosen_rewards.sum().double(), terms.rejected_rewards.sum().double(),
                        margin.sum().double(), pair_wins(margin).double(), policy.chosen.detach().sum().double(),
                        policy.rejected.detach().sum().double()])


def _chosen_tokens(batch: dict) -> int:
    return label_tokens(batch, rows=batch["labels"].shape[0] // 2)


@torch.no_grad()
def evaluate(ctx: StageContext, step: int, generate: bool, reference: ReferenceLogps | None) -> None:
    metrics = {}
    if ctx.eval_rows is not None:
        metrics.update(eval_pairs(ctx, reference))
    if generate and ctx.eval_prompts:
        metrics.update(eval_generation(ctx, step))
    if metrics:
        ctx.tracker.log(step, metrics)


def eval_pairs(ctx: StageContext, reference: ReferenceLogps | None) -> dict:
    """The objective and the reward metrics over the held-out pairs."""
    d = ctx.cfg.stage.dpo

    def score(batch: dict) -> dict:
        policy = pair_logps(ctx.engine, batch, ctx.cfg.trainer.loss_chunk_tokens)
        ref = reference.logps(batch, "eval") if reference else None
        terms = preference_terms(d.loss, policy, ref, d.beta, d.label_smoothing, d.simpo_gamma, d.sft_weight)
        return {**dict(zip(_SUMS, _pair_sums(terms, policy, terms.losses.sum()))),
                "nll": terms.nll.sum(), "pairs": int(batch["num_examples"]),
                "chosen_tokens": _chosen_tokens(batch)}

    totals = held_out(ctx, (*_SUMS, "nll", "pairs", "chosen_tokens"), score)
    nll, pairs, chosen_tokens = (totals.pop(name) for name in ("nll", "pairs", "chosen_tokens"))
    metrics = {name: value / max(pairs, 1) for name, value in totals.items()}
    metrics["loss"] += nll / max(chosen_tokens, 1)
    return {f"eval_{name}": value for name, value in metrics.items()}
