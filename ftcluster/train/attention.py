"""Attention over packed examples without a quadratic mask: sdpa run causally on each example on its own.

transformers' own sdpa keeps the examples of a packed row apart with a block-diagonal `[L, L]` mask built
from the position-id restarts; a masked sdpa call is quadratic in the row and leaves the fast causal kernels.
`varlen_sdpa` instead reads the example boundaries the packed collate sends (`cu_seq_lens_q`, the kwarg
flash-attention's varlen path reads too, ftcluster.data.collate) and calls sdpa with `is_causal=True` on each
example's slice. Measured against flex attention with a document mask on CPU: benchmarks/packed_attention.py.

It is registered under VARLEN_SDPA with a mask function that skips the mask exactly where transformers
would build the packed block mask (no padding mask, no cache). Every other call (padded batches, generation
with a cache) gets transformers' sdpa mask and its sdpa attention unchanged. A forward without the
boundaries but with restarting position_ids (a caller that forwards only input_ids and position_ids) still
attends per example: the boundaries are then found from the position ids, once per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "ftcluster_varlen_sdpa"


def attn_implementation(requested: str, packing: bool, config: PretrainedConfig) -> str:
    """What a model runs: VARLEN_SDPA for packed rows under sdpa, unless the model has sliding-window layers
    (a per-example causal call has no window; transformers' mask does). Anything else as requested:
    flash_attention_2 reads the same boundaries itself, eager builds the block mask from position ids."""
    if requested != "sdpa" or not packing or _has_sliding_window(config.get_text_config()):
        return requested
    register()
    return VARLEN_SDPA


def register() -> None:
    """Make VARLEN_SDPA loadable (`from_pretrained(attn_implementation=VARLEN_SDPA)`); idempotent."""
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_SDPA, _mask_unless_packed)


def varlen_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention interface's signature: query `[B, H, L, D]`, key and value `[B, H_kv, L, D]`; returns
    `[B, L, H, D]`. Per example when the batch says where examples start, transformers' sdpa otherwise."""
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{VARLEN_SDPA} has no sliding window; load this model with attn_implementation=sdpa")
    batch, _, length, _ = query.shape
    self_attention = attention_mask is None and key.shape[2] == length
    if cu_seq_lens_q is not None:
        bounds = _cached_bounds(cu_seq_lens_q)
        key_bounds = bounds if cu_seq_lens_k is None else _cached_bounds(cu_seq_lens_k)
        if not self_attention or batch != 1 or key_bounds != bounds:
            raise ValueError(f"{VARLEN_SDPA} takes cu_seq_lens only for a flattened batch [1, L] in self-attention")
    elif self_attention and position_ids is not None and length > 1:
        # Transformers sometimes passes one row of positions for the whole batch.
        positions = position_ids if position_ids.shape[0] == batch else position_ids.expand(batch, -1)
        bounds = _cached_bounds(positions, _restarts)
    else:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # Rows laid end to end (a no-op for a flattened batch) so that one list of boundaries covers them all.
    q, k, v = (x.transpose(0, 1).reshape(1, x.shape[1], batch * length, x.shape[3]) for x in (query, key, value))
    groups = getattr(module, "num_key_value_groups", 1)
    # split, not one slice per example: the backward of a slice writes a zero-filled gradient of the whole row
    # for every example (and autograd then sums them), split's is one concatenation.
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    out = torch.cat([F.scaled_dot_product_attention(qe, ke, ve, dropout_p=dropout, is_causal=True, scale=scaling,
                                                    enable_gqa=groups > 1)
                     for qe, ke, ve in zip(*(x.split(lengths, dim=2) for x in (q, k, v)))], dim=2)
    return out.reshape(out.shape[1], batch, length, -1).permute(1, 2, 0, 3).contiguous(), None


def _mask_unless_packed(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                        attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    # No padding mask and no cache (queries are the keys): the case where transformers would make the
    # packed block mask from position ids. varlen_sdpa needs none there.
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def _cached_bounds(source: torch.Tensor, derive=lambda t: t.tolist()) -> list[int]:
    # Every layer of one forward gets the same tensor: read it to Python once (one device sync per forward,
    # not per layer), and keep the result on the tensor itself so that it dies with the batch.
    bounds = getattr(source, "_ftcluster_bounds", None)
    if bounds is None:
        bounds = derive(source)
        source._ftcluster_bounds = bounds
    return bounds


def _restarts(position_ids: torch.Tensor) -> list[int]:
    """Example boundaries of rows laid end to end: each row's start and wherever its positions do not step by 1."""
    rows, length = position_ids.shape
    starts = torch.ones(rows, length, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids.diff(dim=-1) != 1
    return starts.flatten().nonzero().flatten().tolist() + [rows * length]


def _has_sliding_window(config: PretrainedConfig) -> bool:
    if getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False:
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or "sliding_attention" in layer_types
