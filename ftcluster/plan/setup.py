"""What the formulas need to know about one training configuration, gathered from the composed train
config and the DeepSpeed config ftcluster would generate for it (so a user's strategy.deepspeed_config
JSON and DeepSpeed's own defaults, e.g. its 5e8-element reduce bucket, are taken into account)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ftcluster.config import derive

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class TrainSetup:
    world: int  # data-parallel ranks, one per device
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    precision: str  # the model's dtype: weights, activations and gradients
    micro_batch: int  # rows per device per forward
    grad_accum: int  # micro-batches per optimizer step
    seq_len: int  # tokens per row: the planner assumes full rows (packing fills them)
    checkpointing: bool
    attention: str  # sdpa, eager or flash_attention_2
    on_gpu: bool  # torch's AdamW runs its multi-tensor (foreach) path on GPUs only
    peft_method: str
    # DeepSpeed ZeRO settings that change what a rank holds.
    reduce_bucket_size: int
    param_persistence_threshold: int
    model_persistence_threshold: int
    sub_group_size: int

    @property
    def dtype_bytes(self) -> int:
        return BYTES[self.precision]

    @property
    def adapter_bytes(self) -> int:
        """Bytes per element of PEFT's trainable weights. peft creates them in fp32; DeepSpeed casts the
        model to bf16/fp16 under ZeRO 0-2 but leaves a model built partitioned (ZeRO-3) as it is."""
        if self.peft_method != "none" and self.zero_stage == 3:
            return 4
        return self.dtype_bytes

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len


def setup_from_config(cfg: DictConfig, on_gpu: bool) -> TrainSetup:
    """The TrainSetup of cfg, whose launcher.workers is the world size. Raises ConfigError as validate()
    does when the global batch does not divide."""
    # not at the top: deepspeed and torch take seconds, which `ftcluster plan --help` and its config checks do without
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from ftcluster.train.engine import deepspeed_config

    derived = derive(cfg)
    ds = deepspeed_config(cfg, derived)
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's defaults for every key not given
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    return TrainSetup(
        world=derived.world_size, zero_stage=int(zero.stage), offload_optimizer=_offloaded(zero.offload_optimizer),
        offload_params=_offloaded(zero.offload_param), precision=precision,
        micro_batch=cfg.trainer.micro_batch_per_device, grad_accum=derived.grad_accum_steps,
        seq_len=cfg.trainer.max_seq_len, checkpointing=cfg.model.gradient_checkpointing,
        attention=cfg.model.attn_implementation, on_gpu=on_gpu, peft_method=cfg.peft.method, reduce_bucket_size=int(zero.reduce_bucket_size),
        param_persistence_threshold=int(zero.param_persistence_threshold),
        model_persistence_threshold=int(zero.model_persistence_threshold),
        sub_group_size=int(zero.sub_group_size))


def _offloaded(section) -> bool:
    return section is not None and str(getattr(section.device, "value", section.device)) != "none"
