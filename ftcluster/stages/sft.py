"""Supervised fine-tuning (SFT), also instruction tuning and continued pretraining on plain text.

Features and their trade-offs:
- Loss: the mean over every label token of the whole global batch (all ranks, all accumulation
  micro-batches), not a mean of per-micro-batch means. Each micro-batch's summed loss is scaled by
  world_size / global_label_tokens before DeepSpeed's backward (which averages over ranks), so the
  gradient equals that of one big batch on one device, whatever the packing, padding, micro-batch size
  or world size. Costs one all-reduce of two numbers per step.
- The head projects only labelled tokens (prompt and padding positions score nothing), so the full
  [tokens, vocab] logits never exist; with trainer.loss_chunk_tokens > 0, that many at a time, upcast to
  fp32 per chunk and recomputed in backward (the memory that dominates at a 128k vocabulary), at one
  extra head matmul per chunk. Fused (Liger) on CUDA where installed. Model families it does not know
  take the full logits (ftcluster.objectives.chunked).
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

from ftcluster.eval.generate import eval_generation
from ftcluster.objectives.cross_entropy import label_tokens, token_loss_sum
from ftcluster.train import loop
from ftcluster.train.context import StageContext
from ftcluster.train.engine import optimizer_step
from ftcluster.train.evaluation import eval_mode, mean_token_loss
from ftcluster.util import dist


def train(ctx: StageContext) -> None:
    for step in loop.steps(ctx, evaluate):
        stats = train_step(ctx.engine, ctx.loader.micro_batches(step.index), ctx.world_size,
                           ctx.cfg.trainer.loss_chunk_tokens)
        step.result = loop.StepResult({"loss": stats["loss"]}, stats["tokens"], stats["label_tokens"],
                                      stats["examples"])


def train_step(engine, micro_batches: list[dict], world_size: int, loss_chunk_tokens: int = 0) -> dict:
    """One optimizer step over this rank's accumulation micro-batches; loss_chunk_tokens > 0 computes the
    loss that many label tokens at a time, never holding the full logits (token_loss_sum)."""
    local = [sum(label_tokens(mb) for mb in micro_batches), sum(int(mb["num_tokens"]) for mb in micro_batches),
             sum(int(mb["num_examples"]) for mb in micro_batches)]
    label_count, tokens, examples = dist.all_reduce_sum(local).tolist()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device())  # on the device: no sync per micro-batch
    for mb in micro_batches:
        summed = token_loss_sum(engine, mb, loss_chunk_tokens)
        engine.backward(summed * (world_size / label_count), scale_wrt_gas=False)
        optimizer_step(engine)
        loss_sum += summed.detach().double()
    loss = dist.all_reduce_sum(loss_sum).item() / label_count
    return {"loss": loss, "label_tokens": label_count, "tokens": tokens, "examples": examples}


@torch.no_grad()
def evaluate(ctx: StageContext, step: int, generate: bool) -> None:
    metrics = {}
    if ctx.eval_rows is not None:
        metrics.update(eval_loss(ctx))
    if generate and ctx.eval_prompts:
        metrics.update(eval_generation(ctx, step))
    if metrics:
        ctx.tracker.log(step, metrics)


def eval_loss(ctx: StageContext) -> dict:
    with eval_mode(ctx.engine):
        loss = mean_token_loss(ctx.engine, ctx.eval_rows, ctx.cfg.trainer.micro_batch_per_device, ctx.rank,
                               ctx.world_size, ctx.pad_id, ctx.cfg.data.packing, ctx.cfg.trainer.loss_chunk_tokens)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
