"""DeepSpeed: the config generated from `strategy`, engine initialization, the optimizer and schedule.

The optimizer is torch's fused AdamW handed to DeepSpeed, never DeepSpeed's own: FusedAdam and cpu_adam
compile C++ on first use (minutes on CPU), and torch's AdamW gives the same updates.

Mixed precision: under bf16 the gradients of a step's micro-batches are summed in fp32 (DeepSpeed's
`data_types.grad_accum_dtype`, which ZeRO 1, 2 and 3 honour; validate() refuses bf16 accumulation without
ZeRO, which DeepSpeed 0.19 cannot do in fp32). On CUDA, fp32 matmuls use TF32 tensor cores and ZeRO 2/3
overlap their gradient reduction with the backward (overlap_comm).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from ftcluster.config import Derived
from ftcluster.config.precision import local_precision
from ftcluster.errors import ConfigError
from ftcluster.observe.comm_time import LOGGER_CONFIG
from ftcluster.util import dist


def deepspeed_config(cfg: DictConfig, derived: Derived) -> dict:
    s, t = cfg.strategy, cfg.trainer
    # validate() resolved auto for a run; `ftcluster plan` hands its config here as composed.
    precision = local_precision(s.precision, cfg.launcher.use_gpu)
    zero: dict = {"stage": s.zero_stage}
    if s.zero_stage >= 1:
        # Reducing gradients on a side stream while the backward goes on pays only on CUDA; DeepSpeed's CPU
        # accelerator has no side streams, and the recorded CPU losses were taken with it off.
        zero.update(overlap_comm=s.zero_stage >= 2 and torch.cuda.is_available(), contiguous_gradients=True)
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if s.zero_stage == 3:
        # Lets the final export gather a consolidated state dict on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_per_device,
        "gradient_accumulation_steps": derived.grad_accum_steps,
        "gradient_clipping": s.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # A torch optimizer under ZeRO: accepted as is, and not swapped for DeepSpeed's compiled CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16" and s.zero_stage >= 1:
        # Summing many micro-batches' gradients in bf16 (8 bits of mantissa) loses the small ones.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if t.profile_comms:
        config["comms_logger"] = dict(LOGGER_CONFIG)
    if s.deepspeed_config:
        config = _deep_merge(config, _read_user_config(s.deepspeed_config))
        _check_batch_keys(config, cfg, derived)
    return config


def _read_user_config(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("strategy.deepspeed_config", f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _check_batch_keys(config: dict, cfg: DictConfig, derived: Derived) -> None:
    """Batch sizes come from `trainer`; a user JSON that disagrees would silently change the run."""
    expected = {"train_batch_size": cfg.trainer.global_batch,
                "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_per_device,
                "gradient_accumulation_steps": derived.grad_accum_steps}
    for key, value in expected.items():
        if config.get(key, value) not in (value, "auto"):
            raise ConfigError("strategy.deepspeed_config",
                              f"{cfg.strategy.deepspeed_config} sets {key}={config[key]} but the trainer section "
                              f"gives {value}; remove it from the JSON and set trainer.global_batch / "
                              f"trainer.micro_batch_per_device instead")
        config[key] = value


@contextmanager
def zero3_construction(ds_config: dict):
    """While active, transformers builds models partitioned across ranks (ZeRO-3) as they load."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


def build_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Biases and norm scales are not weights to shrink toward zero. A ZeRO-3 partitioned parameter is an
        # empty 1-D tensor here: its real shape is ds_shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters instead of a Python loop of a few kernels per tensor (on CPU, the
    # loop is torch's default: SmolLM2-135M's step 325 -> 108 ms on 2 cores); the same update to float rounding.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             fused=True)


def lr_multiplier(step: int, cfg: DictConfig) -> float:
    """Linear warm-up, then cosine, linear or constant decay to lr * min_lr_ratio at max_steps."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.min_lr_ratio
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.optim.scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.optim.scheduler == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def initialize(model: torch.nn.Module, cfg: DictConfig, ds_config: dict):
    """The DeepSpeed engine, which owns the model, optimizer and schedule from here on."""
    import deepspeed  # not at the top (here and below): the driver imports this module and needs no DeepSpeed

    enable_tf32()
    if cfg.strategy.offload_optimizer:
        use_optimizer_threads(cfg.launcher.cpus_per_worker)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
    plain = _plain_fp32(ds_config)
    if plain:  # ftcluster clips (optimizer_step), from the norm it measures anyway
        clipping, ds_config = ds_config["gradient_clipping"], {**ds_config, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    if plain:
        _clipping_here[engine] = clipping
        if engine.dp_world_size == 1:
            # DeepSpeed would still flatten every gradient into a bucket, all-reduce it across this one rank
            # and copy it back at each accumulation boundary (1.4 ms of a 58 ms step on the tiny model). ZeRO's
            # and the mixed-precision optimizers do their own bookkeeping in that reduction: they keep it.
            engine.enable_backward_allreduce = False
    return engine


def _plain_fp32(ds_config: dict) -> bool:
    """No ZeRO and no mixed precision: DeepSpeed steps the torch optimizer on the module's own fp32 gradients,
    clipping them by a norm it computes per parameter in Python, all-reduces across ranks and then drops."""
    return not (ds_config["zero_optimization"]["stage"] or ds_config["bf16"]["enabled"]
                or ds_config["fp16"]["enabled"])


def import_deferred() -> None:
    """What DeepSpeed imports or probes on first use, done now: its Muon optimizer module, which
    deepspeed.initialize imports to check the optimizer, and the op-compatibility probe that dist.setup reads.
    Where one interpreter forks every rank (launcher=processes on CPU) each rank then inherits them instead of
    paying them again."""
    import deepspeed

    _import_muon_without_compiling()
    deepspeed.ops.__compatible_ops__  # noqa: B018  (a probe on first read)


_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_muon_without_compiling() -> None:
    """DeepSpeed's Muon module, whose kernels are torch.compile'd on their first call instead of at its import.
    Every ZeRO optimizer imports it to ask whether the optimizer is a Muon one (an isinstance check), and its
    import wraps two kernels in torch.compile, which imports TorchDynamo and Inductor: 1-2 s of CPU in every
    rank of every run, Muon or not. Only a Muon run calls the kernels, and pays for the compiler then."""
    if _MUON in sys.modules:
        return
    from deepspeed.runtime import compiler

    eager = compiler.compile
    compiler.compile = lambda: _compile_on_first_call
    try:
        importlib.import_module(_MUON)
    finally:
        compiler.compile = eager


def _compile_on_first_call(function):
    compiled = None

    @functools.wraps(function)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(function)
        return compiled(*args, **kwargs)

    return call


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores (about 8x an fp32 H100's throughput, 10 bits of
    mantissa): what fp32 master-weight updates and an fp32 run's matmuls use on CUDA. No effect on CPU."""
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def use_optimizer_threads(cpus: int) -> None:
    """With the optimizer offloaded, torch's AdamW updates the fp32 states on the CPU, with torch's intra-op
    threads, which Ray and torchrun set to 1 (OMP_NUM_THREADS): give it the CPUs launcher.cpus_per_worker
    reserves for this rank instead. Raise that key to speed the offloaded step up."""
    if cpus > torch.get_num_threads():
        torch.set_num_threads(cpus)


# On the plain fp32 path (_plain_fp32), by engine: the clipping norm ftcluster applies, and the gradient norm
# of the last update, which DeepSpeed does not keep.
_clipping_here: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_norms_measured_here: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def optimizer_step(engine) -> None:
    """engine.step() after each micro-batch's backward (DeepSpeed updates at the accumulation boundary).

    On the plain fp32 path ftcluster measures the gradient norm and clips by it itself (torch's foreach norm,
    the same rule as DeepSpeed's and torch's clip_grad_norm_): DeepSpeed would compute it again, per parameter,
    and throw it away, so get_global_grad_norm() would stay None. At the boundary the backward has already
    averaged the gradients over ranks, so this rank's norm is the global one."""
    clipping = _clipping_here.get(engine)
    if clipping is not None and engine.is_gradient_accumulation_boundary():
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        if params and clipping > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clipping, norm)
        _norms_measured_here[engine] = float(norm)
    engine.step()


def grad_norm(engine) -> float:
    """The global gradient norm of the last update, before clipping; nan when no update has happened."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = _norms_measured_here.get(engine)
    return float(norm) if norm is not None else float("nan")


def initialize_frozen(model: torch.nn.Module, ds_config: dict):
    """A frozen model for inference (a reference or reward model), sharded like the policy: under ZeRO-3 a
    DeepSpeed engine without an optimizer (parameters partitioned, gathered layer by layer), else the
    plain module (ZeRO 0-2 shard only optimizer state and gradients, which a frozen model has none of)."""
    enable_tf32()
    if ds_config["zero_optimization"]["stage"] != 3:
        return model.to(dist.device())
    import deepspeed  # see initialize

    frozen = {key: value for key, value in ds_config.items() if key not in ("optimizer", "scheduler")}
    frozen["zero_optimization"] = {key: value for key, value in ds_config["zero_optimization"].items()
                                   if key != "offload_optimizer"}
    engine, _, _, _ = deepspeed.initialize(model=model, config=frozen, dist_init_required=False)
    return engine


def full_state_dict(engine) -> dict | None:
    """The whole model's weights on rank 0 (None elsewhere); every rank must call it under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
