"""Supervised fine-tuning (SFT), also instruction tuning and continued pretraining on plain text.

Features and their trade-offs:
- Loss: the mean over every label token of the whole global batch (all ranks, all accumulation
  micro-batches), not a mean of per-micro-batch means. Each micro-batch's summed loss is scaled by
  world_size / global_label_tokens before DeepSpeed's backward (which averages over ranks), so the
  gradient equals that of one big batch on one device, whatever the packing, padding, micro-batch size
  or world size. Costs one all-reduce of two numbers per step.
- Packing: rows hold several examples with position ids restarting per example; attention never
  crosses examples (see ftcluster.data.packing).
- Evaluation at step 0, every trainer.eval_every_steps and at the last step: eval_loss, eval_ppl. With
  trainer.eval_generate, greedy generation scored by exact match (eval_exact_match) and the other
  trainer.eval_metrics (eval_<name>, ftcluster.eval.scores) before training, at the last step and every
  trainer.eval_generate_every_steps: decoding costs far more than a loss pass.
- Checkpoints, resume and export as every SPMD stage has them (ftcluster.train.loop): resume
  restores model, optimizer, schedule, RNG and data position (a pure function of the step); final/ holds
  consolidated safetensors + tokenizer (merged weights and final/adapter/ with PEFT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ftcluster.util import dist
from ftcluster.train.engine import optimizer_step
from ftcluster.eval.generate import generate_answers
from ftcluster.eval.scores import compute as compute_metrics
from ftcluster.train import loop
from ftcluster.stages.context import StageContext

MODEL_KIND = "causal_lm"


def train(ctx: StageContext) -> None:
    loop.run(ctx, step, evaluate)


def step(ctx: StageContext, index: int) -> loop.StepResult:
    stats = train_step(ctx.engine, ctx.loader.micro_batches(index), ctx.world_size)
    return loop.StepResult({"loss": stats["loss"]}, stats["tokens"], stats["label_tokens"], stats["examples"])


def train_step(engine, micro_batches: list[dict], world_size: int) -> dict:
    """One optimizer step over this rank's accumulation micro-batches."""
    local = [sum(_label_tokens(mb) for mb in micro_batches), sum(int(mb["num_tokens"]) for mb in micro_batches),
             sum(int(mb["num_examples"]) for mb in micro_batches)]
    label_tokens, tokens, examples = dist.all_reduce_sum(local).tolist()
    loss_sum = 0.0
    for mb in micro_batches:
        summed = token_loss_sum(engine, mb)
        engine.backward(summed * (world_size / label_tokens), scale_wrt_gas=False)
        optimizer_step(engine)
        loss_sum += summed.item()
    loss = dist.all_reduce_sum([loss_sum])[0].item() / label_tokens
    return {"loss": loss, "label_tokens": label_tokens, "tokens": tokens, "examples": examples}


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over label positions, in fp32."""
    inputs = {k: v.to(dist.device()) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    # use_cache=False is what makes transformers honour packed position_ids (no cross-example attention).
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"].to(logits.device)
    logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def _label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def evaluate(ctx: StageContext, step: int, generate: bool) -> None:
    metrics = {}
    if ctx.eval_rows is not None:
        metrics.update(eval_loss(ctx))
    if generate and ctx.eval_prompts:
        metrics.update(eval_generation(ctx, step))
    if metrics:
        ctx.tracker.log(step, metrics)


def eval_generation(ctx: StageContext, step: int) -> dict:
    """Greedy answers to the held-out prompts, scored against their references by exact match and the
    other trainer.eval_metrics."""
    prompts = [p["prompt"] for p in ctx.eval_prompts]
    predictions = generate_answers(
        ctx.engine.module, ctx.tokenizer, prompts, max_new_tokens=ctx.cfg.trainer.eval_max_new_tokens,
        # One generate() call per rank when the share is small: decoding is latency-bound.
        batch_size=min(32, math.ceil(len(prompts) / ctx.world_size)),
        synced=ctx.engine.zero_optimization_partition_weights() and ctx.world_size > 1)
    names = dict.fromkeys(["exact_match", *ctx.cfg.trainer.eval_metrics])
    scores = compute_metrics(names, predictions, [p["reference"] for p in ctx.eval_prompts])
    ctx.tracker.message(f"step {step}: held-out exact match {scores['exact_match']:.1%} ({len(predictions)} "
                        f"examples); e.g. {predictions[0]!r}")
    return {f"eval_{name}": value for name, value in scores.items()}


def eval_loss(ctx: StageContext) -> dict:
    engine = ctx.engine
    engine.eval()
    loss = mean_token_loss(engine, ctx.eval_rows, ctx.cfg.trainer.micro_batch_per_device, ctx.rank, ctx.world_size,
                           ctx.pad_id, ctx.cfg.data.packing)
    engine.train()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def mean_token_loss(model, rows, micro_batch: int, rank: int, world_size: int, pad_id: int, packed: bool) -> float:
    """Cross-entropy per label token over all of `rows`, this rank scoring its share (also `ftcluster eval`'s
    perplexity, so both measure the same thing)."""
    from ftcluster.data.loader import eval_batches

    # eval_batches gives every rank as many batches (ZeRO-3 forwards are collectives); fillers count nothing.
    loss_sum = tokens = 0.0
    for batch in eval_batches(rows, micro_batch, rank, world_size, pad_id, packed):
        loss_sum += token_loss_sum(model, batch).item()
        tokens += _label_tokens(batch)
    loss_sum, tokens = dist.all_reduce_sum([loss_sum, tokens]).tolist()
    return loss_sum / max(tokens, 1)
