"""Model loading: dtype, attention implementation, gradient checkpointing, PEFT.

Packed rows under sdpa run ftcluster.train.attention's per-example sdpa instead of a block mask.

Called in each worker with the model folder the driver resolved. Under ZeRO-3 the caller activates
DeepSpeed's config first (engine.zero3_construction) so that from_pretrained builds the model
already partitioned: no rank ever holds the whole model in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, BitsAndBytesConfig)

from ftcluster.errors import ConfigError
from ftcluster.train.attention import attn_implementation
from ftcluster.train.tokenizer import load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# What a stage trains: a causal LM (SFT, DPO, the RL policy), a scalar score per sequence (reward model)
# or per token (PPO's critic). The heads of the last two start random on a causal-LM folder.
MODEL_CLASSES = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification,
                 "value": AutoModelForTokenClassification}
_PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "reward": "SEQ_CLS", "value": "TOKEN_CLS"}


def build_loading_tables() -> None:
    """What transformers builds on a process's first from_pretrained, built now: its table of checkpoint weight
    renamings for every model type (hundreds of regular expressions compiled: 0.1-0.2 s). Called by a rank's
    preload, so that the ranks launcher=processes forks from one interpreter inherit it."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a transformers without the table: nothing to build
        return
    get_checkpoint_conversion_mapping("llama")  # builds the table for all model types, then looks one up


def write_random_init(model_dir: str, out_dir: Path, seed: int, trust_remote_code: bool = False) -> None:
    """Write `model_dir`'s model with weights drawn from `seed`, and its tokenizer, into `out_dir`
    (random_init.materialize_random_init decides whether to, and where)."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.save_pretrained(out_dir)
    load_tokenizer(model_dir, trust_remote_code).save_pretrained(out_dir)


def load_model(cfg: DictConfig, model_dir: str, kind: str = "causal_lm", peft: bool = True,
               trainable: bool = True) -> torch.nn.Module:
    """The model of `kind` with PEFT applied (unless peft=False), in the strategy's precision.
    trainable=False: a frozen copy for inference (a reference model), without checkpointing or PEFT."""
    dtype = DTYPES[cfg.strategy.precision]
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                  attn_implementation=attn_implementation(cfg.model.attn_implementation, cfg.data.packing, config))
    if cfg.peft.method == "qlora":
        kwargs["quantization_config"] = _qlora_quantization(dtype)
    if kind != "causal_lm":
        kwargs.update(num_labels=1, pad_token_id=_pad_token_id(model_dir, cfg.model.trust_remote_code))
    model = MODEL_CLASSES[kind].from_pretrained(model_dir, **kwargs)
    # Needed for correctness, not only memory: with use_cache on, transformers skips detecting packed
    # sequences from position_ids (the fallback when a caller forwards no cu_seq_lens, ftcluster.data.collate)
    # and lets packed examples attend to each other.
    model.config.use_cache = False
    if not trainable:
        return model.eval().requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft and cfg.peft.method != "none":
        # Adapter weights start random: the same seed on every rank (ZeRO partitions each rank's copy)
        # and whatever the loading consumed before, so runs with any strategy start alike.
        torch.manual_seed(cfg.seed)
        model = apply_peft(model, cfg, kind)
    return model


def _pad_token_id(model_dir: str, trust_remote_code: bool) -> int:
    # A score head reads the last token that is not padding (transformers' rule); tokenizer and config
    # must agree on what padding is, in training and for whoever loads final/.
    return load_tokenizer(model_dir, trust_remote_code).pad_token_id


def apply_peft(model: torch.nn.Module, cfg: DictConfig, kind: str = "causal_lm") -> torch.nn.Module:
    # not at the top (here and in peft_config): peft's import takes seconds, and full fine-tuning does without it
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.peft.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    elif cfg.model.gradient_checkpointing:
        # With frozen embeddings nothing before the first checkpointed block requires grad;
        # this makes the checkpointed blocks' inputs require it so their adapters get gradients.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config(cfg, model, kind))


def peft_config(cfg: DictConfig, model: torch.nn.Module, kind: str = "causal_lm"):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType  # see apply_peft

    p = cfg.peft
    if p.method in ("lora", "dora", "qlora"):
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in p.target_modules if m not in names]
        if missing:
            raise ConfigError("peft.target_modules", f"{missing} are not modules of this model; "
                                                     f"linear layers it has include {sorted(_linear_names(model))}")
        # For the score heads peft's SEQ_CLS / TOKEN_CLS tasks also train the (new) head in full.
        return LoraConfig(task_type=TaskType[_PEFT_TASKS[kind]], r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                          target_modules=list(p.target_modules), use_dora=p.method == "dora")
    if p.method == "prompt":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens)
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p.num_virtual_tokens)


def _linear_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def _qlora_quantization(dtype: torch.dtype):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)

