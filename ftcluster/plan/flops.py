"""Training FLOPs per token from a model's shape.

Convention (PaLM, appendix B; torchtitan's MFU): a multiply-add is 2 FLOPs; a token's forward costs 2 FLOPs
per weight of every matmul it goes through (the decoder's linear layers, for a mixture of experts only the
router and the experts it is routed to, and the output layer, tied or not; embedding lookups, norms and
biases are not matmuls) plus attention's two matmuls, QK^T and AV, over the whole sequence: 4 x seq x
q_dim per layer, not halved for the causal mask (the convention MFU figures are quoted in). The backward
costs twice the forward for activation gradients and weight gradients each, but weight gradients only for
weights that train: 6N + 12 L s q_dim for full fine-tuning, 4N + 6N_adapters + 12 L s q_dim with LoRA
(frozen weights still pass activation gradients on). Gradient checkpointing recomputes the decoder layers'
forward once more (not the output layer's): "hardware" FLOPs, close to 4/3 of the model FLOPs. MFU is
measured with the model FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftcluster.plan.shape import ModelShape, Tensor


@dataclass(frozen=True)
class TokenFlops:
    """FLOPs per trained token: `model` without recomputation (for MFU), `hardware` what runs."""

    model: int
    hardware: int


def layer_matmul_weights(shape: ModelShape) -> int:
    """Matmul weights one token goes through in one decoder layer."""
    h, f = shape.hidden, shape.intermediate
    attention = h * shape.q_dim + 2 * h * shape.kv_dim + shape.q_dim * h
    if shape.experts:
        mlp = h * shape.experts + shape.experts_per_token * 3 * h * f
    else:
        mlp = 3 * h * f
    return attention + mlp


def attention_forward_flops(shape: ModelShape, seq_len: int) -> int:
    """QK^T and AV of one token against the whole sequence, in every layer."""
    return shape.layers * 4 * seq_len * shape.q_dim


def training_flops_per_token(shape: ModelShape, tensors: list[Tensor], seq_len: int,
                             checkpointing: bool) -> TokenFlops:
    layers = shape.layers * layer_matmul_weights(shape)
    head = shape.vocab * shape.hidden
    adapters = sum(t.numel for t in tensors if t.module in ("lora_A", "lora_B"))
    base_trains = any(t.trainable and t.module and not t.module.startswith("lora_") for t in tensors)
    weighted = layers + head + adapters  # every matmul a token goes through
    with_weight_gradients = (layers + head if base_trains else 0) + adapters
    attention = attention_forward_flops(shape, seq_len)
    model = 2 * weighted + 2 * weighted + 2 * with_weight_gradients + 3 * attention
    recompute = 2 * (layers + adapters) + attention if checkpointing else 0
    return TokenFlops(model=model, hardware=model + recompute)
