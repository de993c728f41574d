"""Cross-entropy and selected-token log-probs from the final hidden states at the labelled positions only, so
the full [tokens, vocab] logits never exist: at a 128k vocabulary and 16k tokens per micro-batch those are
4 GB in bf16 plus 8 GB for their fp32 copy, more than the rest of a 7B model's activations; and prompt and
padding positions, which score nothing, cost no head FLOPs (on the tiny model, whose head is a large part of
it, a forward and backward of the sft benchmark's padded micro-batches took 20.1 ms instead of 24.6 ms).

How:
- The model runs as usual (DeepSpeed engine, PEFT wrapper and all), but a pre-hook on its output embedding
  captures the hidden states it is given and hands it zero positions instead, so the model's logits come
  out empty. Everything between the backbone and the head (norms, PEFT's virtual tokens) stays the model's.
- Only labelled positions are projected. chunk_tokens=0 (trainer.loss_chunk_tokens' default) projects them
  in one piece, whose logits autograd keeps for backward (fewer than the full logits: the labelled ones).
- chunk_tokens > 0 bounds the memory instead: that many label tokens at a time, each chunk wrapped in
  torch.utils.checkpoint so that backward recomputes its logits instead of keeping them. The cost is one
  extra head matmul per chunk in backward (the head's FLOPs go from 3 to 4 matmuls).
- The head is called as a *module* (so LoRA on lm_head, tied embeddings and ZeRO-3's gather hooks all apply
  as in a normal forward), and its output upcast to fp32 for that piece only.
- ZeRO-3: calling the module (rather than gathering the weight once with GatheredParameters) is the
  choice, because the gradient must reach the partitioned weight through DeepSpeed's own hooks, and the
  backward recompute happens after a GatheredParameters block would have re-partitioned the weight.
  The price is a gather per chunk call where DeepSpeed releases the weight between calls (its
  stage3_max_reuse_distance decides); not yet measured on GPU.
- Chunks split the label tokens evenly, as many as the batch's positions need at loss_chunk_tokens each:
  the count depends only on the batch's shape, which keeps ZeRO-3's recorded module order stable.
- On CUDA with liger-kernel installed and a plain nn.Linear head (no LoRA on it, not ZeRO-3 partitioned,
  no logit transform), the summed loss uses Liger's fused linear cross-entropy instead.

Models whose CausalLM forward does something to the logits that is not listed in _LOGIT_TRANSFORMS are
not chunked: callers fall back to full logits (head_of returns None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftcluster.data.template import IGNORE

def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _softcap(cap: float) -> Callable:
    return lambda logits: torch.tanh(logits / cap) * cap


# What each model family's CausalLM forward does to lm_head's output (transformers 5.x), so that chunks do
# the same. A family not listed here is not chunked.
_LOGIT_TRANSFORMS: dict[str, Callable] = {
    **{name: lambda config: _identity for name in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "olmo",
        "olmo2", "starcoder2", "smollm3")},
    **{name: lambda config: _softcap(config.final_logit_softcapping) if config.final_logit_softcapping else _identity
       for name in ("gemma2", "gemma3_text")},
    **{name: lambda config: (lambda logits: logits * config.logit_scale) for name in ("cohere", "cohere2")},
    "granite": lambda config: (lambda logits: logits / config.logits_scaling),
}


@dataclass
class Head:
    module: torch.nn.Module  # the output embedding as the model calls it (LoRA-wrapped, ZeRO-3-hooked)
    transform: Callable  # what the model's forward does to the head's output


def head_of(model) -> Head | None:
    """The model's LM head and logit transform, or None when this model cannot be chunked."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    config = getattr(inner, "config", None)
    make = _LOGIT_TRANSFORMS.get(getattr(config, "model_type", None))
    module = inner.get_output_embeddings() if make and hasattr(inner, "get_output_embeddings") else None
    return Head(module, make(config)) if module is not None else None


def final_hidden(model, inputs: dict, head: Head) -> torch.Tensor:
    """[batch, positions, hidden]: what the model's forward hands its LM head, from a forward whose logits
    are empty. Includes any virtual tokens PEFT prepends (prompt tuning)."""
    captured = []

    def capture(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.module.register_forward_pre_hook(capture)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def _labelled(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label (next-token shift), those labels, and their flat positions.

    The positions are found on the labels' own device (the CPU for loader batches), so no device sync."""
    targets = labels[:, 1:].reshape(-1)
    positions = (targets != IGNORE).nonzero().squeeze(1)
    targets = targets[positions].to(hidden.device)
    positions = positions.to(hidden.device)
    # Row-major [batch, length - 1] index -> [batch, length] index, so hidden is read without copying it.
    rows = positions + positions // max(labels.shape[1] - 1, 1)
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return states, targets, positions


def _chunk_logits(head: Head, states: torch.Tensor) -> torch.Tensor:
    return head.transform(head.module(states).float())


def _chunk_loss_sum(head: Head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_chunk_logits(head, states), targets, reduction="sum")


def _chunk_logps(head: Head, temperature: float, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = _chunk_logits(head, states)
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _per_chunk(fn: Callable, states: torch.Tensor, targets: torch.Tensor, positions: int,
               chunk_tokens: int) -> list[torch.Tensor]:
    """fn over chunks of rows; under autograd each chunk is checkpointed, so its logits are recomputed in
    backward rather than kept. chunk_tokens <= 0: fn over all rows at once, nothing recomputed.

    The label tokens are split into as many equal chunks as the batch's positions would need at chunk_tokens
    each: never more than chunk_tokens per chunk, and a count that depends only on the batch's shape, so
    that ZeRO-3's recorded order of module calls (for prefetching) holds from one micro-batch to the next.
    A chunk may be empty; the head still runs on it, which gives every parameter its (zero) gradient even
    for a batch with no label, as ZeRO's gradient reduction needs on every rank."""
    if chunk_tokens <= 0:  # one piece, its logits kept for backward
        return [fn(states, targets)]
    count = max(-(-positions // chunk_tokens), 1)
    out = []
    for args in zip(states.tensor_split(count), targets.tensor_split(count)):
        out.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    return out


def loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: Head, chunk_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy over the label positions of `labels`, in fp32."""
    states, targets, _ = _labelled(hidden, labels)
    fused = _liger_loss_sum(head, states, targets)
    if fused is not None:
        return fused
    chunks = _per_chunk(lambda s, t: _chunk_loss_sum(head, s, t), states, targets, labels[:, 1:].numel(),
                        chunk_tokens)
    return torch.stack(chunks).sum()


def labelled_logps(hidden: torch.Tensor, labels: torch.Tensor, head: Head, chunk_tokens: int,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, length - 1] log-probs of the labels (next-token shift; 0 where unlabelled), in fp32, and
    the label mask."""
    mask = labels[:, 1:] != IGNORE
    states, targets, positions = _labelled(hidden, labels)
    picked = _per_chunk(lambda s, t: _chunk_logps(head, temperature, s, t), states, targets, mask.numel(),
                        chunk_tokens)
    flat = hidden.new_zeros(mask.numel(), dtype=torch.float32).index_put((positions,), torch.cat(picked))
    return flat.view(mask.shape), mask.to(hidden.device)


def _liger_loss_sum(head: Head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Liger's fused linear cross-entropy where it applies, else None. NEVER RUN: no CUDA machine yet."""
    weight = getattr(head.module, "weight", None)
    # Liger takes the weight itself: not for a LoRA-wrapped head, a logit transform, a ZeRO-3 partitioned
    # weight (ds_id; empty outside its module's call), or no_grad (it computes gradients in its forward).
    if (not states.is_cuda or not torch.is_grad_enabled() or states.shape[0] == 0 or hasattr(weight, "ds_id")
            or type(head.module) is not torch.nn.Linear or head.transform is not _identity):
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(
        weight, states, targets, head.module.bias)
