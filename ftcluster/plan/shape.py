"""A model's shape, read from its Hugging Face config.json without touching any weights, and the list of
parameter tensors that shape implies (with PEFT's adapters added): what the FLOP and memory formulas count.

The planner answers for a 70B model on a laptop, so nothing here builds a model: transformers' AutoConfig
reads config.json (filling each architecture's defaults, e.g. head_dim, num_key_value_heads), and the
tensor list is written out for the decoder families it knows: Llama, Mistral, Qwen2/3 (dense) and Mixtral
(mixture of experts). tests/test_plan.py checks the counts against transformers and peft on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ftcluster.config import ASSETS
from ftcluster.errors import ConfigError, DataError
from ftcluster.train.bundled import MODELS, PREFIX

DENSE = ("llama", "mistral", "qwen2", "qwen3")
MOE = ("mixtral",)
# Linear layers by the module names peft's target_modules match. Mixtral's experts are fused 3-D
# parameters in transformers 5 (no per-expert nn.Linear), so LoRA there reaches attention only.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # per expert for mixture-of-experts models
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: an RMSNorm over head_dim on queries and keys
    experts: int = 0  # 0: a dense MLP
    experts_per_token: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor. `module` is the leaf module's name (what peft's target_modules match) for
    linear weights, with the matmul's `fan_in` and `fan_out`; `ndim` decides its optimizer group (vectors
    get no weight decay, as in ftcluster.train.engine.build_optimizer)."""

    name: str
    numel: int
    trainable: bool
    ndim: int = 1
    module: str = ""
    fan_in: int = 0
    fan_out: int = 0


def shape_from_config(config, source: str) -> ModelShape:
    """The shape of a transformers PretrainedConfig; `source` names the file in errors."""
    model_type = getattr(config, "model_type", None)
    if model_type not in DENSE + MOE:
        raise DataError(source, None, f"model_type {model_type!r} is not one the planner models; it knows "
                                      f"{', '.join(DENSE + MOE)}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qkv_bias = bool(getattr(config, "attention_bias", model_type == "qwen2"))
    return ModelShape(
        model_type=model_type, hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=config.intermediate_size, vocab=config.vocab_size,
        tied_embeddings=bool(config.tie_word_embeddings), qkv_bias=qkv_bias,
        # Qwen2 puts biases on q, k and v only; Llama's attention_bias covers o_proj too.
        o_bias=qkv_bias and model_type != "qwen2", mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        experts=getattr(config, "num_local_experts", 0) if model_type in MOE else 0,
        experts_per_token=getattr(config, "num_experts_per_tok", 0) if model_type in MOE else 0)


def read_shape(folder: str) -> ModelShape:
    """The shape in FOLDER/config.json. A file that is not valid JSON is named with its line."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError("model.path", f"{folder} holds no config.json: point model.path at a Hugging Face model "
                                        f"folder (only config.json is read)")
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(str(path), exc.lineno, f"not valid JSON ({exc.msg})") from None
    from transformers import AutoConfig  # not at the top: `ftcluster plan --help` and its config checks do without

    try:
        config = AutoConfig.from_pretrained(str(path.parent))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DataError(str(path), None, f"transformers cannot read this config ({str(exc).splitlines()[0]})") from None
    return shape_from_config(config, str(path))


def config_folder(cfg: DictConfig) -> str:
    """The folder whose config.json describes cfg's model: model.path, or for a bundled model the copy of
    its converted config.json that ships with ftcluster (no GGUF conversion needed to plan)."""
    path = cfg.model.path
    if path is None:
        raise ConfigError("model.path", "no model: pick one with model=NAME (conf/model/) or set model.path=DIR")
    if path.startswith(PREFIX):
        name = path[len(PREFIX):]
        if name not in MODELS:
            raise ConfigError("model.path", f"unknown bundled model '{name}'; known: "
                                            + ", ".join(PREFIX + n for n in sorted(MODELS)))
        return str(ASSETS / MODELS[name].config)
    return path


def parameter_tensors(shape: ModelShape, peft: DictConfig | None = None) -> list[Tensor]:
    """Every parameter tensor of the model (a tied lm_head is the embedding, listed once), with PEFT's
    adapters and trainable flags: everything trains without PEFT, only the adapters with it."""
    method = peft.method if peft is not None else "none"
    base_trainable = method == "none"
    h, t = shape.hidden, base_trainable
    tensors = [Tensor("embed_tokens.weight", shape.vocab * h, t, 2)]
    for i in range(shape.layers):
        tensors += _layer_tensors(shape, f"layers.{i}.", t)
    tensors.append(Tensor("norm.weight", h, t))
    if not shape.tied_embeddings:
        tensors.append(Tensor("lm_head.weight", shape.vocab * h, t, 2, "lm_head", h, shape.vocab))
    if method in ("lora", "dora", "qlora"):
        tensors += _lora_tensors(tensors, peft, dora=method == "dora")
    elif method == "prompt":
        tensors.append(Tensor("prompt_encoder.embedding.weight", peft.num_virtual_tokens * h, True, 2))
    elif method == "prefix":
        # peft's prefix tuning (no projection) stores keys and values for every layer at the KV width.
        tensors.append(Tensor("prompt_encoder.embedding.weight",
                              peft.num_virtual_tokens * shape.layers * 2 * shape.kv_dim, True, 2))
    return tensors


def _linear(prefix: str, module: str, fan_in: int, fan_out: int, trainable: bool, bias: bool) -> list[Tensor]:
    out = [Tensor(f"{prefix}{module}.weight", fan_in * fan_out, trainable, 2, module, fan_in, fan_out)]
    if bias:
        out.append(Tensor(f"{prefix}{module}.bias", fan_out, trainable))
    return out


def _layer_tensors(shape: ModelShape, prefix: str, trainable: bool) -> list[Tensor]:
    h, f = shape.hidden, shape.intermediate
    attn = prefix + "self_attn."
    tensors = (_linear(attn, "q_proj", h, shape.q_dim, trainable, shape.qkv_bias)
               + _linear(attn, "k_proj", h, shape.kv_dim, trainable, shape.qkv_bias)
               + _linear(attn, "v_proj", h, shape.kv_dim, trainable, shape.qkv_bias)
               + _linear(attn, "o_proj", shape.q_dim, h, trainable, shape.o_bias))
    if shape.qk_norm:
        tensors += [Tensor(attn + "q_norm.weight", shape.head_dim, trainable),
                    Tensor(attn + "k_norm.weight", shape.head_dim, trainable)]
    mlp = prefix + "mlp."
    if shape.experts:
        e = shape.experts
        tensors += [Tensor(mlp + "gate.weight", h * e, trainable, 2),  # the router
                    Tensor(mlp + "experts.gate_up_proj", e * 2 * f * h, trainable, 3),
                    Tensor(mlp + "experts.down_proj", e * h * f, trainable, 3)]
    else:
        tensors += (_linear(mlp, "gate_proj", h, f, trainable, shape.mlp_bias)
                    + _linear(mlp, "up_proj", h, f, trainable, shape.mlp_bias)
                    + _linear(mlp, "down_proj", f, h, trainable, shape.mlp_bias))
    return tensors + [Tensor(prefix + "input_layernorm.weight", h, trainable),
                      Tensor(prefix + "post_attention_layernorm.weight", h, trainable)]


def _lora_tensors(tensors: list[Tensor], peft: DictConfig, dora: bool) -> list[Tensor]:
    targets = set(peft.target_modules)
    present = {t.module for t in tensors if t.module}
    missing = sorted(targets - present)
    if missing:
        # The same refusal ftcluster.train.model.peft_config gives when the run starts.
        raise ConfigError("peft.target_modules", f"{missing} are not modules of this model; "
                                                 f"linear layers it has include {sorted(present)}")
    r, adapters = peft.r, []
    for t in tensors:
        if t.module in targets:
            base = t.name.rsplit(".", 1)[0]
            adapters += [Tensor(f"{base}.lora_A.weight", r * t.fan_in, True, 2, "lora_A", t.fan_in, r),
                         Tensor(f"{base}.lora_B.weight", t.fan_out * r, True, 2, "lora_B", r, t.fan_out)]
            if dora:
                adapters.append(Tensor(f"{base}.lora_magnitude_vector", t.fan_out, True))
    return adapters
