"""Bytes one rank holds during an SFT step, by what holds them: the analytical half of the planner.

States, as DeepSpeed 0.19 lays them out with the torch AdamW ftcluster hands it (ftcluster.train.engine), for
Ψ parameters of which T train, on W ranks, b bytes per model-dtype element:
- parameters (model dtype): ZeRO 0-2 keep all Ψ·b on every rank (ZeRO-1/2 flatten the trainable ones into
  one buffer per optimizer group, padded to a multiple of 2W elements). ZeRO-3 keeps ceil(n/W) elements of
  each tensor, plus a whole copy of each tensor of at most stage3_param_persistence_threshold (1e5)
  elements, which it never partitions.
- optimizer: Adam's two fp32 moments, a 4-byte step counter per optimizer tensor, and the fp32 master copy
  of the trainable weights. The master copy: none with ZeRO-0 in fp32 (the optimizer updates the weights
  themselves); a whole one with ZeRO-0 in bf16/fp16 (DeepSpeed's FP16_Optimizer); the rank's 1/W
  partition with ZeRO 1-3, always (a copy even in fp32). ZeRO 1-3 divide the moments by W too.
  PEFT's weights stay fp32 under ZeRO-3: peft creates them in fp32 and DeepSpeed casts only a model it
  did not build partitioned (ZeRO 0-2 train them in the model's dtype).
- gradients (model dtype) at their fullest, end of backward through the optimizer step: all T with ZeRO
  0/1 (plus the fp32 copy of the rank's partition ZeRO 1-3 build for the update), the rank's T/W with
  ZeRO-2/3; DeepSpeed's reduce bucket (reduce_bucket_size elements, 5e8 by default) with ZeRO 1-3.
Activations per token and decoder layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", section 4, redone for the Llama block, with e bytes per activation element):
each RMSNorm keeps its input in fp32 (4h) and its 1/rms, plus its scaled input (eh) when its weight
trains; a linear layer's input (eh) is kept when its weight trains or a LoRA adapter reads it (an fp32
adapter in a bf16 model keeps an fp32 copy of its own); attention keeps the rotated queries (e·q_dim), keys
and values, the output (e·q_dim) and fp32 softmax statistics (4 per head); sdpa with a mask, as packed rows
have, expands grouped keys and values to every head first (2e·q_dim) and keeps the mask made additive in
every layer (e·seq per token), flash-attention does neither; eager attention also keeps the fp32 softmax
probabilities and their e-byte copy (seq x heads per token): the s² term sdpa and flash never
materialise. The SwiGLU MLP keeps gate, silu(gate), up and their product (4ef). A LoRA adapter keeps its
rank-r intermediate. With gradient checkpointing a layer keeps only its input (eh), and backward
recomputes one layer at a time once the loss gradient is gone. The loss over the vocabulary keeps fp32
log-probabilities (4V per token) and briefly needs twice as much again for their gradient (8V).
tests/test_plan.py holds the arithmetic. Against the tensor bytes alive in real DeepSpeed steps on a CPU
(ZeRO 0-3, fp32/bf16, full/LoRA, with and without checkpointing, 1 and 2 ranks) activations came within
0.1% and the peak within 4%.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ftcluster.plan.setup import TrainSetup
from ftcluster.plan.shape import ModelShape, Tensor

FP32 = 4
STEP_COUNTER = 4  # torch AdamW's per-tensor `step`, a float32 scalar
# ZeRO-0 all-reduces gradients flattened into buckets of this many elements (DeepSpeed's fixed
# deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE), a copy beside the gradients, before the update.
ALLREDUCE_BUCKET = 500_000_000


@dataclass(frozen=True)
class RankMemory:
    """Bytes per rank. Everything but `host` is on the device. `peak` = the states held throughout on the
    device (params, optimizer and ZeRO-3's buffer, less what is offloaded) + either `activations` +
    `transient` (phase "backward": the turn from forward to backward) or the gradients on the device +
    `transient` (phase "reduce": the end of a ZeRO-1/2 backward; "step": the optimizer step)."""

    params: int
    optimizer: int
    gradients: int
    buffers: int
    activations: int
    transient: int  # the loss gradient and ZeRO-3's gathered weights, or the optimizer's temporaries
    phase: str  # "backward" or "step": where the peak is
    peak: int
    host: int  # offloaded to host memory (optimizer with offload_optimizer, weights with offload_params)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- states -----------------------------------------------------------------------------------------------

def optimizer_groups(tensors: list[Tensor]) -> list[list[Tensor]]:
    """ftcluster.train.engine.build_optimizer's groups: weight-decayed matrices, then vectors and norms."""
    decay, rest = [], []
    for t in tensors:
        if t.trainable:
            (decay if t.ndim >= 2 and "norm" not in t.name.lower() else rest).append(t)
    return [g for g in (decay, rest) if g]


def _zero12_partition(group: list[Tensor], world: int) -> int:
    # DeepSpeed flattens a group into one buffer padded to a multiple of 2W elements (4-byte NCCL
    # alignment x ranks) and gives each rank an equal slice.
    return math.ceil(sum(t.numel for t in group) / (2 * world)) * 2


def _zero3_partition(t: Tensor, world: int) -> int:
    return math.ceil(t.numel / world)


def zero3_persistent(tensors: list[Tensor], setup: TrainSetup) -> list[Tensor]:
    """The tensors ZeRO-3 keeps whole on every rank (DeepSpeed's mark_persistent_parameters)."""
    kept, total = [], 0
    for t in tensors:
        if t.numel + total > setup.model_persistence_threshold:
            continue
        if t.numel <= setup.param_persistence_threshold:
            kept.append(t)
            total += t.numel
    return kept


def optimizer_slices(tensors: list[Tensor], setup: TrainSetup) -> list[int]:
    """Element counts of the fp32 tensors the optimizer updates on this rank, one per optimizer tensor."""
    groups, w = optimizer_groups(tensors), setup.world
    if setup.zero_stage == 0:
        return [t.numel for g in groups for t in g]
    if setup.zero_stage in (1, 2):
        return [_zero12_partition(g, w) for g in groups]
    slices = []  # ZeRO-3: each group in sub-groups of about sub_group_size partitioned elements
    for group in groups:
        sizes = [_zero3_partition(t, w) for t in group]
        if setup.sub_group_size >= sum(sizes):
            slices.append(sum(sizes))
            continue
        current = 0
        for i, size in enumerate(sizes):
            current += size
            if current >= setup.sub_group_size or i == len(sizes) - 1:
                slices.append(current)
                current = 0
    return slices


def _element_bytes(t: Tensor, setup: TrainSetup) -> int:
    return setup.adapter_bytes if t.trainable and setup.peft_method != "none" else setup.dtype_bytes


def zero3_param_bytes(tensors: list[Tensor], setup: TrainSetup) -> tuple[int, int]:
    """ZeRO-3's weights on this rank: (its partitions of every tensor, the whole copies of the persistent
    ones). On one rank a persistent tensor's whole copy is its partition."""
    partitions = sum(_element_bytes(t, setup) * _zero3_partition(t, setup.world) for t in tensors)
    persistent = zero3_persistent(tensors, setup) if setup.world > 1 else []
    return partitions, sum(_element_bytes(t, setup) * t.numel for t in persistent)


def param_bytes(tensors: list[Tensor], setup: TrainSetup) -> int:
    """Weights on this rank between steps (wherever they live)."""
    w = setup.world
    if setup.zero_stage == 3:
        return sum(zero3_param_bytes(tensors, setup))
    if setup.zero_stage == 0:
        return sum(_element_bytes(t, setup) * t.numel for t in tensors)
    frozen = sum(t.numel for t in tensors if not t.trainable)
    return setup.dtype_bytes * (frozen + sum(_zero12_partition(g, w) * w for g in optimizer_groups(tensors)))


def master_bytes(tensors: list[Tensor], setup: TrainSetup) -> int:
    """The fp32 master copy of the trainable weights this rank updates (none when ZeRO-0 updates fp32
    weights in place; ZeRO 1-3 always partition a copy, in fp32 too)."""
    if setup.zero_stage == 0 and setup.precision == "fp32":
        return 0
    return FP32 * sum(optimizer_slices(tensors, setup))


def optimizer_bytes(tensors: list[Tensor], setup: TrainSetup) -> int:
    """What the optimizer holds: the master copy, Adam's moments and step counters."""
    slices = optimizer_slices(tensors, setup)
    return master_bytes(tensors, setup) + 2 * FP32 * sum(slices) + STEP_COUNTER * len(slices)


def gradient_bytes(tensors: list[Tensor], setup: TrainSetup) -> int:
    """Gradients at their fullest (end of backward through the optimizer step)."""
    b, trainable = setup.dtype_bytes, sum(t.numel for t in tensors if t.trainable)
    slices = sum(optimizer_slices(tensors, setup))
    if setup.zero_stage == 0:
        # In bf16/fp16 DeepSpeed's FP16_Optimizer also builds fp32 gradients for its master copy.
        return b * trainable + (0 if setup.precision == "fp32" else FP32 * trainable)
    full = b * trainable if setup.zero_stage == 1 else b * slices
    return full + FP32 * slices  # ZeRO 1-3 flatten the partition's gradients into fp32 for the update


def buffer_bytes(tensors: list[Tensor], setup: TrainSetup) -> int:
    """DeepSpeed's reduce bucket: ZeRO-1/2 allocate it in each backward and release it after the step,
    ZeRO-3 keeps it from the start. A GPU's caching allocator holds all of it; on a CPU only the pages the
    gradients pass through are ever touched, so only those are in memory."""
    if setup.zero_stage == 0:
        return 0
    elements = setup.reduce_bucket_size
    if not setup.on_gpu:
        elements = min(elements, sum(t.numel for t in tensors if t.trainable))
    return elements * setup.dtype_bytes


def host_bytes(tensors: list[Tensor], setup: TrainSetup) -> int:
    """What offloading moves to host memory."""
    host = 0
    if setup.offload_optimizer:
        slices = sum(optimizer_slices(tensors, setup))
        host += optimizer_bytes(tensors, setup) + FP32 * slices  # and the fp32 gradients of the update
        if setup.zero_stage == 3:
            host += setup.dtype_bytes * slices  # ZeRO-3's gradient partitions follow the optimizer
    if setup.offload_params:
        host += zero3_param_bytes(tensors, setup)[0]  # the partitions; persistent copies stay on the device
    return host


# ---- activations ------------------------------------------------------------------------------------------

def layer_activation_bytes_per_token(shape: ModelShape, setup: TrainSetup, tensors: list[Tensor]) -> int:
    """Bytes one decoder layer keeps for backward per token, without checkpointing."""
    e, a, h, f = setup.dtype_bytes, setup.adapter_bytes, shape.hidden, shape.intermediate
    trained, adapted = _trained_modules(tensors), _adapted_modules(tensors)

    def linear_input(width: int, consumers: tuple[str, ...]) -> int:
        # Kept in the model's dtype when a consumer's weight trains (or an adapter in that dtype reads it);
        # an fp32 adapter in a bf16 model keeps its own fp32 copy, one per adapted module.
        kept = any(m in trained or m in adapted and a == e for m in consumers)
        upcast = sum(1 for m in consumers if m in adapted and a != e)
        return e * width * kept + FP32 * width * upcast

    norm_trains = any(t.trainable and "layernorm" in t.name for t in tensors)
    norm = FP32 * h + FP32 + (e * h if norm_trains else 0)  # fp32 input, its reciprocal RMS, the scaled input
    if setup.attention == "flash_attention_2":
        keys_values = 2 * e * shape.kv_dim
    else:
        keys_values = 2 * e * shape.q_dim  # transformers' repeat_kv before sdpa/eager whenever a mask is passed
    # The rotated queries, keys and values, the output (o_proj's input) and the softmax statistics.
    attention = (linear_input(h, ("q_proj", "k_proj", "v_proj")) + e * shape.q_dim + keys_values
                 + e * shape.q_dim + FP32 * shape.heads)
    if "o_proj" in adapted and a != e:
        attention += FP32 * shape.q_dim
    if setup.attention == "eager":
        attention += (FP32 + (e if e != FP32 else 0)) * shape.heads * setup.seq_len
    if shape.qk_norm:
        attention += (FP32 + e) * (shape.q_dim + shape.kv_dim)
    if shape.experts:
        f *= shape.experts_per_token
        mlp = e * h + 4 * e * f  # the experts' weights are parameters, not nn.Linear: always kept
    else:
        mlp = linear_input(h, ("gate_proj", "up_proj")) + 3 * e * f + linear_input(f, ("down_proj",))
    adapters = a * _lora_rank(tensors) * len(adapted)
    return 2 * norm + attention + mlp + adapters


def activation_bytes(shape: ModelShape, setup: TrainSetup, tensors: list[Tensor]) -> int:
    """Bytes one micro-batch keeps for backward at the turn from forward to backward: the decoder layers
    (with checkpointing, each layer's input only), the final norm, the fp32 log-probabilities of the loss
    and the attention mask."""
    tokens, e, h = setup.tokens_per_micro_batch, setup.dtype_bytes, shape.hidden
    trained = _trained_modules(tensors) | _adapted_modules(tensors)
    if setup.checkpointing:
        layers = shape.layers * e * h
    else:
        layers = shape.layers * layer_activation_bytes_per_token(shape, setup, tensors)
        if not any(t.trainable and t.name == "embed_tokens.weight" for t in tensors):
            layers -= FP32 * h + FP32  # nothing needs the gradient of the first norm's input
    # The final norm (its scaled input when its weight trains, its output when the output layer trains),
    # the fp32 log-probabilities, token ids and labels (int64), rotary cos and sin.
    norm_trains = any(t.trainable and t.name == "norm.weight" for t in tensors)
    head_trains = "lm_head" in trained or shape.tied_embeddings and any(
        t.trainable and t.name == "embed_tokens.weight" for t in tensors)
    head = (FP32 * h + FP32 + e * h * norm_trains + e * h * head_trains + FP32 * shape.vocab + 16
            + 2 * e * shape.head_dim)
    # Packed rows' block-diagonal mask reaches sdpa/eager as a boolean mask, which torch turns into an
    # additive one in the model's dtype in every layer and keeps for backward (flash-attention takes none).
    # With checkpointing only the model's boolean mask stays, as an input of every checkpointed layer.
    if setup.attention == "flash_attention_2":
        mask = 0
    elif setup.checkpointing:
        mask = setup.micro_batch * setup.seq_len ** 2
    else:
        mask = shape.layers * e * setup.micro_batch * setup.seq_len ** 2
    return tokens * (layers + head) + mask


def recompute_bytes(shape: ModelShape, setup: TrainSetup, tensors: list[Tensor]) -> int:
    """With checkpointing, the one layer whose activations backward recomputes at a time."""
    if not setup.checkpointing:
        return 0
    return setup.tokens_per_micro_batch * layer_activation_bytes_per_token(shape, setup, tensors)


def _trained_modules(tensors: list[Tensor]) -> set[str]:
    """Linear modules whose own weight trains."""
    return {t.module for t in tensors if t.trainable and t.module and not t.module.startswith("lora_")}


def _adapted_modules(tensors: list[Tensor]) -> set[str]:
    """Linear modules a LoRA adapter reads the input of."""
    return {t.name.split(".")[-3] for t in tensors if t.module == "lora_A"}


def _lora_rank(tensors: list[Tensor]) -> int:
    return next((t.fan_out for t in tensors if t.module == "lora_A"), 0)


# ---- the peak ---------------------------------------------------------------------------------------------

def rank_memory(shape: ModelShape, setup: TrainSetup, tensors: list[Tensor]) -> RankMemory:
    """Every term above for one rank, and the peak: the largest of three moments, on top of the states
    held throughout (params, optimizer, ZeRO-3's gradient buffer, less what is offloaded):
    - "backward", the turn from forward to backward: activations + the loss gradient + ZeRO-3's gathered
      weights + gradients already held (+ on a GPU ZeRO-1/2's reduce bucket, allocated whole as the
      backward starts; on a CPU its pages are written only as gradients arrive, while activations go);
    - "reduce", the end of the backward (ZeRO-1/2): the bucket full, the rank's gradient partition and its
      fp32 copy (ZeRO-2: beside the partition the earlier micro-batches accumulated); DeepSpeed releases
      the bucket before the optimizer step;
    - "step", the optimizer step: the gradients + the update's temporaries."""
    params, optimizer = param_bytes(tensors, setup), optimizer_bytes(tensors, setup)
    gradients, buffers = gradient_bytes(tensors, setup), buffer_bytes(tensors, setup)
    activations = activation_bytes(shape, setup, tensors)

    states = params + optimizer + (buffers if setup.zero_stage == 3 else 0)
    if setup.offload_optimizer:
        states -= optimizer
    if setup.offload_params:
        states -= zero3_param_bytes(tensors, setup)[0]
    device_grads = _device_gradients(tensors, setup, gradients)

    # The loss gradient comes first; ZeRO-2's gradient partition (when a step starts without it) and a
    # recomputed layer only after it is gone.
    loss_gradient = 2 * FP32 * shape.vocab * setup.tokens_per_micro_batch
    standing = _standing_gradients(tensors, setup)
    partition = (setup.dtype_bytes * sum(optimizer_slices(tensors, setup))
                 if setup.zero_stage == 2 and not standing and not setup.offload_optimizer else 0)
    bucket = buffers if setup.zero_stage in (1, 2) else 0
    at_turn = (max(loss_gradient, partition + recompute_bytes(shape, setup, tensors))
               + _gathered_bytes(shape, tensors, setup) + standing + (bucket if setup.on_gpu else 0))
    moments = {"backward": (activations, at_turn), "step": (device_grads, _step_temporaries(tensors, setup))}
    if bucket:
        moments["reduce"] = (device_grads, bucket + (standing if setup.zero_stage == 2 else 0))
    phase = max(moments, key=lambda name: sum(moments[name]))  # the first of equals: the turn
    transient = moments[phase][1]
    return RankMemory(params=params, optimizer=optimizer, gradients=gradients, buffers=buffers,
                      activations=activations, transient=transient, phase=phase,
                      peak=states + sum(moments[phase]), host=host_bytes(tensors, setup))


def _device_gradients(tensors: list[Tensor], setup: TrainSetup, gradients: int) -> int:
    if not setup.offload_optimizer:
        return gradients
    # Offloaded, the fp32 copy for the update lives on the host, and so do ZeRO-3's partitions.
    if setup.zero_stage == 3:
        return 0
    return gradients - FP32 * sum(optimizer_slices(tensors, setup))


def _standing_gradients(tensors: list[Tensor], setup: TrainSetup) -> int:
    """Gradients already held when a backward starts: ZeRO-3's partition buffer, kept from the start; with
    ZeRO 0-2 what the step's earlier micro-batches accumulated (all of it, ZeRO-2 its partition), which is
    released after each step. Offloaded, the partitions are in host memory."""
    b = setup.dtype_bytes
    if setup.zero_stage < 2:
        return b * sum(t.numel for t in tensors if t.trainable) if setup.grad_accum > 1 else 0
    if setup.offload_optimizer or setup.zero_stage == 2 and setup.grad_accum == 1:
        return 0
    return b * sum(optimizer_slices(tensors, setup))


def _gathered_bytes(shape: ModelShape, tensors: list[Tensor], setup: TrainSetup) -> int:
    """ZeRO-3's gathered weights at the turn: the output layer (the forward's last module is the backward's
    first) and the layer the backward gathers next. Not the forward's last layers nor a prefetch bucket: with
    a complete trace and stage3_max_reuse_distance far above the model, DeepSpeed 0.19 still had every layer
    released at the turn (SmolLM2, 2 ranks, full and LoRA: the resident set after the forward grew by the
    activations alone, and counting the reused layers put the peak 13% and 38% too high)."""
    if setup.zero_stage != 3 or setup.world == 1:  # on one rank a partition is the whole tensor
        return 0
    persistent = {t.name for t in zero3_persistent(tensors, setup)}
    layer = sum(t.numel for t in tensors if t.name.startswith("layers.0.") and t.name not in persistent)
    return setup.dtype_bytes * (shape.vocab * shape.hidden + layer)


def _step_temporaries(tensors: list[Tensor], setup: TrainSetup) -> int:
    """What the step needs beside the gradients: ZeRO-0's flattened all-reduce bucket. torch's fused AdamW
    (ftcluster.train.engine) updates its states in place, one kernel over every tensor: no temporaries."""
    if setup.zero_stage != 0:
        return 0
    return setup.dtype_bytes * min(sum(t.numel for t in tensors if t.trainable), ALLREDUCE_BUCKET)
