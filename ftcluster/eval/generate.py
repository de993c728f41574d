"""Generation-based evaluation: greedy answers to held-out prompts, scored against references.

Prompts are spread over the ranks. Under ZeRO-3 every forward is a collective (parameters are
gathered layer by layer), so every rank runs the same number of generate() calls with
synced_gpus=True, padding its share with a repeated prompt whose answer is discarded.

Gathering layer by layer for every generated token costs a whole-model all-gather per token. So when the
whole model fits in a device's free memory (with room left for the KV cache), it is gathered once for the
whole generation (whole_model_gathered) and released after; otherwise the per-layer gathering stays, and
the log says so.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ftcluster.util import dist
from ftcluster.eval.scores import compute, exact_match


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                     synced: bool) -> list[str]:
    """This rank's share of `prompts` (every world_size-th), answered greedily; gathered to all ranks in order."""
    rank, world = dist.rank(), dist.world_size()
    mine = list(range(rank, len(prompts), world))
    calls = math.ceil(math.ceil(len(prompts) / world) / batch_size)
    answers: dict[int, str] = {}
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    try:
        for call in range(calls):
            batch = mine[call * batch_size:(call + 1) * batch_size]
            real = len(batch)
            batch = batch + [mine[0] if mine else 0] * (batch_size - real) if synced else batch
            if not batch:
                continue
            texts = [tokenizer.apply_chat_template(prompts[i], tokenize=False, add_generation_prompt=True)
                     for i in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dist.device())
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=synced, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(batch[:real], out[:real]):
                answers[i] = tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    merged: dict[int, str] = {}
    for part in dist.all_gather_objects(answers):
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]


# The gathered model may take this share of a device's free memory; generation's KV cache and activations
# need the rest.
FIT_FRACTION = 0.5


def gathered_bytes(params: list[torch.nn.Parameter]) -> int:
    """The bytes these parameters take gathered whole (a ZeRO-3 parameter's full size is ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)


def fits_whole(model_bytes: int, free_bytes: int) -> bool:
    return model_bytes <= FIT_FRACTION * free_bytes


def _free_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    import psutil  # not at the top: only a CPU ZeRO-3 run asks, and Ray brings it

    return psutil.virtual_memory().available


@contextmanager
def whole_model_gathered(model: torch.nn.Module, partitioned: bool, log: Callable[[str], None]) -> Iterator[bool]:
    """Under ZeRO-3 (`partitioned`), the whole model gathered on every rank while inside, when it fits on every
    rank's device; collective. Yields whether it did."""
    if not partitioned:
        yield False
        return
    params = list(model.parameters())
    size = gathered_bytes(params)
    # Every rank must take the same branch: GatheredParameters is a collective.
    fits = all(dist.all_gather_objects(fits_whole(size, _free_bytes())))
    if not fits:
        log(f"generation keeps ZeRO-3's per-layer gathering (an all-gather of every layer per token): the model "
            f"({size / 2**30:.1f} GiB) does not fit in {FIT_FRACTION:.0%} of a device's free memory")
        yield False
        return
    import deepspeed  # not at the top: the driver imports eval modules and needs no DeepSpeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield True


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / max(1, len(references))


def eval_generation(ctx, step: int) -> dict:
    """A training stage's generation-based evaluation: greedy answers to its held-out prompts (ctx: a
    ftcluster.train.context.StageContext), scored against their references by exact match and the other
    trainer.eval_metrics; the eval_<name> metrics to log."""
    prompts = [p["prompt"] for p in ctx.eval_prompts]
    partitioned = ctx.engine.zero_optimization_partition_weights()
    with whole_model_gathered(ctx.engine.module, partitioned, ctx.tracker.message):
        predictions = generate_answers(
            ctx.engine.module, ctx.tokenizer, prompts, max_new_tokens=ctx.cfg.trainer.eval_max_new_tokens,
            # One generate() call per rank when the share is small: decoding is latency-bound.
            batch_size=min(32, math.ceil(len(prompts) / ctx.world_size)),
            # Gathered or not, ranks stay in step: ZeRO-3's hooks still run on every forward.
            synced=partitioned and ctx.world_size > 1)
    names = dict.fromkeys(["exact_match", *ctx.cfg.trainer.eval_metrics])
    scores = compute(names, predictions, [p["reference"] for p in ctx.eval_prompts])
    ctx.tracker.message(f"step {step}: held-out exact match {scores['exact_match']:.1%} ({len(predictions)} "
                        f"examples); e.g. {predictions[0]!r}")
    return {f"eval_{name}": value for name, value in scores.items()}
