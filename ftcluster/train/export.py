"""Hugging Face model folders from training state: `final/` at the end of a run, and `ftcluster export`.

Both paths end in write_final(): a CPU model is built from the base folder, the consolidated weights
are loaded into it strictly (so missing or unexpected keys fail loudly instead of saving empty
weights), and the folder is written beside its destination and renamed into place.

QLoRA trains adapters on a 4-bit base that never changes: its state dict holds packed uint8 base weights and
bitsandbytes' quantization state, which no plain model can load. So the export reloads the base from the
model folder in the run's precision (bf16 or fp32, never 4-bit), loads only the trained weights (the adapters,
and a score head) into it, and merges there, as peft users do: final/ holds plain safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ftcluster.config import load_run_config
from ftcluster.data.template import apply_template_override
from ftcluster.errors import UserError
from ftcluster.train import checkpoint as ckpt
from ftcluster.train.model import DTYPES, MODEL_CLASSES, apply_peft, peft_config
from ftcluster.train.tokenizer import load_tokenizer
from ftcluster.util.atomic import replacing
from ftcluster.util.outputs import claim_folder, mark_folder

EXPORT_COMMAND = "ftcluster export"
from ftcluster.train.safe_load import load_weights, weights_only_loads


def write_final(state_dict: dict, cfg: DictConfig, model_dir: str, out_dir: str | Path, tokenizer=None,
                kind: str = "causal_lm", mark_as: str | None = None) -> Path:
    """`tokenizer` defaults to the base folder's with the run's data.chat_template applied. `kind` is the
    model the stage trained (ftcluster.train.model.MODEL_CLASSES): a reward model's final/ loads with
    AutoModelForSequenceClassification. `mark_as`: the command whose output the folder is (util/outputs.py),
    for a folder outside a run's own layout."""
    out_dir = Path(out_dir)
    trust = cfg.model.trust_remote_code
    extra = {} if kind == "causal_lm" else {"num_labels": 1,
                                            "pad_token_id": load_tokenizer(model_dir, trust).pad_token_id}
    model = MODEL_CLASSES[kind].from_pretrained(model_dir, dtype=DTYPES[cfg.strategy.precision],
                                                trust_remote_code=trust, **extra)
    uses_peft = cfg.peft.method != "none"
    if cfg.peft.method == "qlora":
        model = _with_adapter_unquantized(model, cfg, kind)
        state_dict = trained_weights(state_dict, model)
    elif uses_peft:
        model = apply_peft(model, _without_checkpointing(cfg), kind)
    _load_exactly(model, state_dict, partial=uses_peft)
    tokenizer = tokenizer if tokenizer is not None else _run_tokenizer(cfg, model_dir)
    with replacing(out_dir) as tmp:
        if uses_peft:
            model.save_pretrained(tmp / "adapter")  # before merging, which folds the adapter into the base
            tokenizer.save_pretrained(tmp / "adapter")
            if cfg.export.merge and cfg.peft.method in ("lora", "dora", "qlora"):
                model = model.merge_and_unload()
            else:
                # Not merged: final/ holds the base weights and final/adapter/ the adapter to apply on them.
                model = model.get_base_model()
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if mark_as:
            mark_folder(tmp, mark_as)
    return out_dir


def _run_tokenizer(cfg: DictConfig, model_dir: str):
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    if cfg.data.format != "text":
        apply_template_override(tokenizer, cfg.data.chat_template)
    return tokenizer


def _with_adapter_unquantized(model: torch.nn.Module, cfg: DictConfig, kind: str) -> torch.nn.Module:
    """The QLoRA adapter on a plain (unquantized) base: peft's LoRA without prepare_model_for_kbit_training,
    which would upcast the whole base to fp32 for a training that does not happen here."""
    from peft import get_peft_model  # not at the top: peft's import takes seconds

    return get_peft_model(model, peft_config(cfg, model, kind))


def trained_weights(state_dict: dict, model: torch.nn.Module) -> dict:
    """The entries of `state_dict` that training changed: the model's trainable parameters. What QLoRA's frozen
    4-bit base adds (packed weights, absmax, quant_map, quant_state...) is dropped: the base is reloaded unquantized."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    kept = {k: v for k, v in state_dict.items() if k in trainable}
    missing = sorted(trainable - kept.keys())
    if missing:
        raise RuntimeError(f"the QLoRA checkpoint lacks trained weights {missing[:5]}; it was not written by this "
                           f"run's peft settings (peft.r, peft.target_modules)")
    return kept


def _without_checkpointing(cfg: DictConfig) -> DictConfig:
    copy = cfg.copy()
    copy.model.gradient_checkpointing = False
    return copy


def _load_exactly(model: torch.nn.Module, state_dict: dict, partial: bool) -> None:
    """Strict load; with PEFT a checkpoint may hold only the trainable weights (frozen ones excluded)."""
    result = model.load_state_dict(state_dict, strict=False)
    # named_parameters() lists a tied weight once, so a checkpoint that stores it once is complete.
    needed = {name for name, p in model.named_parameters() if p.requires_grad or not partial}
    missing = [k for k in result.missing_keys if k in needed]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    if not state_dict:
        raise RuntimeError("refusing to export an empty state dict")


def checkpoint_state_dict(checkpoint: Path, zero_stage: int) -> dict:
    """Consolidated fp32 weights from a DeepSpeed checkpoint, on CPU, in one process."""
    tag_dir = checkpoint / ckpt.TAG
    if zero_stage == 0:
        return load_weights(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    # not at the top: the driver imports this module and needs no DeepSpeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 calls torch.load(weights_only=False) itself: made weights_only here (ftcluster.train.safe_load).
    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ckpt.TAG)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path | None, merge: bool | None,
                      overwrite: bool = False) -> Path:
    """`ftcluster export`: a final/-style folder from any complete checkpoint of a run. `out_dir` must be new or
    empty, or an earlier export (its marker) with `overwrite`: nothing else there is ever replaced."""
    checkpoint = Path(checkpoint)
    if (checkpoint / ckpt.STATE_FILE).is_file() is False:
        raise UserError(f"{checkpoint} is not a complete ftcluster checkpoint (no {ckpt.STATE_FILE}); "
                        f"pick a checkpoints/step-N folder of a run")
    run_dir = checkpoint.parent.parent
    cfg = load_run_config(run_dir / "config.yaml")
    if merge is not None:
        cfg.export.merge = merge
    out_dir = Path(out_dir or run_dir / f"export-{checkpoint.name}")
    claim_folder(out_dir, EXPORT_COMMAND, option="--out", inputs=[checkpoint], overwrite=overwrite)
    state = ckpt.read_state(checkpoint)
    state_dict = checkpoint_state_dict(checkpoint, cfg.strategy.zero_stage)
    return write_final(state_dict, cfg, state["model_dir"], out_dir, kind=state.get("model_kind", "causal_lm"),
                       mark_as=EXPORT_COMMAND)
