"""Scoring held-out rows, shared by the SPMD stages and `ftcluster eval`'s workers: one loop over a rank's
share of the eval rows that sums what each batch scores across ranks, and the loss per token built on it.
A stage says only what it scores per batch. (Generation-based evaluation: ftcluster.eval.generate.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from ftcluster.data.loader import eval_batches
from ftcluster.objectives.cross_entropy import label_tokens, token_loss_sum
from ftcluster.util import dist

if TYPE_CHECKING:
    from ftcluster.train.context import StageContext

# What a batch scores, per name: a number known on the host (a count), or a one-element tensor on the device
# (a loss sum), which stays there until the whole pass is summed.
Score = Callable[[dict], dict]


@torch.no_grad()
def summed(rows, names: Sequence[str], score: Score, micro_batch: int, rank: int, world_size: int, pad_id: int,
           packed: bool) -> dict[str, float]:
    """`score` of every batch of this rank's share of `rows`, summed per name over all batches of all ranks.

    Collective. Every rank scores as many batches (eval_batches pads a short share with fillers), because a
    ZeRO-3 forward, or any collective inside `score`, needs every rank; what a filler scores is dropped.
    `names` fixes what is summed even on a rank whose share is fillers only. The device's values come back to
    the host once, after the last batch."""
    on_host = torch.zeros(len(names), dtype=torch.float64)
    on_device = torch.zeros(len(names), dtype=torch.float64, device=dist.device())
    for batch in eval_batches(rows, micro_batch, rank, world_size, pad_id, packed):
        scored = score(batch)
        if int(batch["num_examples"]) == 0:
            continue
        for i, name in enumerate(names):
            if torch.is_tensor(scored[name]):
                on_device[i] += scored[name].detach().double().reshape(())
            else:
                on_host[i] += scored[name]
    return dict(zip(names, dist.all_reduce_sum(on_host + dist.to_host(on_device)).tolist()))


@contextmanager
def eval_mode(engine) -> Iterator[None]:
    """No dropout while evaluating; training mode again after."""
    engine.eval()
    yield
    engine.train()


def held_out(ctx: StageContext, names: Sequence[str], score: Score, packed: bool = False) -> dict[str, float]:
    """summed() over a stage's eval rows, in eval mode."""
    with eval_mode(ctx.engine):
        return summed(ctx.eval_rows, names, score, ctx.cfg.trainer.micro_batch_per_device, ctx.rank,
                      ctx.world_size, ctx.pad_id, packed)


def mean_token_loss(model, rows, micro_batch: int, rank: int, world_size: int, pad_id: int, packed: bool,
                    chunk_tokens: int = 0) -> float:
    """Cross-entropy per label token over all of `rows`, this rank scoring its share (a stage's eval_loss and
    `ftcluster eval`'s perplexity both, so they measure the same thing); chunk_tokens as in token_loss_sum."""
    totals = summed(rows, ("loss", "tokens"),
                    lambda batch: {"loss": token_loss_sum(model, batch, chunk_tokens), "tokens": label_tokens(batch)},
                    micro_batch, rank, world_size, pad_id, packed)
    return totals["loss"] / max(totals["tokens"], 1)

