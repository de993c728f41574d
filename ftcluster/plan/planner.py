"""`ftcluster plan`: every candidate configuration of a train config on a cluster, what each needs per device
and how fast it runs, and the recommendation: the fastest that fits.

Candidates: ZeRO 0-3 with their offload choices, gradient checkpointing off and on, micro-batches of 1, 2,
4, ... up to max_micro_batch; the model, data length, precision and PEFT are the config's. Every device
of the profile is a data-parallel rank. With a global batch given, a micro-batch it cannot be divided
into is not a candidate; without one, each candidate's step is one micro-batch on every device. The step
modelled is SFT's (rows of trainer.max_seq_len tokens, a loss over the vocabulary); other stages are
planned as that step on the same rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from omegaconf import DictConfig

from ftcluster.errors import ConfigError
from ftcluster.plan.predict import Prediction, predict_shape
from ftcluster.plan.profiles import ClusterProfile
from ftcluster.plan.setup import setup_from_config
from ftcluster.plan.shape import ModelShape, config_folder, parameter_tensors, read_shape

# (label, ZeRO stage, offload optimizer, offload parameters)
STRATEGIES = [("zero0", 0, False, False), ("zero1", 1, False, False), ("zero1+offload", 1, True, False),
              ("zero2", 2, False, False), ("zero2+offload", 2, True, False), ("zero3", 3, False, False),
              ("zero3+offload", 3, True, False), ("zero3+offload+params", 3, True, True)]


@dataclass(frozen=True)
class Candidate:
    strategy: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool
    micro_batch: int
    grad_accum: int
    prediction: Prediction

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "prediction"}
        return {**out, **self.prediction.as_dict()}

    def overrides(self) -> list[str]:
        """The `ftcluster train` overrides that select this candidate."""
        return [f"strategy.zero_stage={self.zero_stage}", f"strategy.offload_optimizer={str(self.offload_optimizer).lower()}",
                f"strategy.offload_params={str(self.offload_params).lower()}",
                f"model.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"trainer.micro_batch_per_device={self.micro_batch}"]


@dataclass
class Plan:
    shape: ModelShape
    total_params: int
    trainable_params: int
    profile: ClusterProfile
    global_batch: int | None  # None: one micro-batch per device per step
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def recommended(self) -> Candidate | None:
        fitting = [c for c in self.candidates if c.prediction.fits]
        return max(fitting, key=lambda c: c.prediction.tokens_per_s) if fitting else None


def plan(cfg: DictConfig, profile: ClusterProfile, global_batch: int | None = None,
         max_micro_batch: int = 16) -> Plan:
    """The candidates of cfg on profile. global_batch: rows per optimizer step (None: micro-batch x devices)."""
    shape = read_shape(config_folder(cfg))
    tensors = parameter_tensors(shape, cfg.peft)
    world = profile.devices
    micro_batches = [m for m in _powers_of_two(max_micro_batch) if global_batch is None or global_batch % (m * world) == 0]
    if not micro_batches:
        raise ConfigError("trainer.global_batch", f"{global_batch} rows per step cannot be shared by the "
                                                  f"cluster's {world} devices; use a multiple of {world}, e.g. "
                                                  f"trainer.global_batch={world * 8}")
    result = Plan(shape=shape, total_params=sum(t.numel for t in tensors),
                  trainable_params=sum(t.numel for t in tensors if t.trainable), profile=profile,
                  global_batch=global_batch)
    base = copy.deepcopy(cfg)
    base.launcher.workers = world
    base.trainer.micro_batch_per_device = micro_batches[0]
    base.trainer.global_batch = global_batch or micro_batches[0] * world
    base_setup = setup_from_config(base, on_gpu=profile.device == "gpu")
    for label, stage, offload_optimizer, offload_params in STRATEGIES:
        if world == 1 and stage > 0 and not offload_optimizer:
            continue  # nothing to partition on one device: only offloading changes anything
        for checkpointing in (False, True):
            for micro in micro_batches:
                setup = replace(base_setup, zero_stage=stage, offload_optimizer=offload_optimizer,
                                offload_params=offload_params, checkpointing=checkpointing, micro_batch=micro,
                                grad_accum=global_batch // (micro * world) if global_batch else 1)
                result.candidates.append(Candidate(label, stage, offload_optimizer, offload_params, checkpointing,
                                                   micro, setup.grad_accum,
                                                   predict_shape(shape, tensors, setup, profile)))
    return result


def _powers_of_two(limit: int) -> list[int]:
    values, m = [], 1
    while m <= limit:
        values.append(m)
        m *= 2
    return values
