"""What every eval worker runs: for each model in turn, this rank's share of the perplexity batches and of
the prompts (ftcluster.eval.generate.generate_answers spreads them over the ranks), summed or gathered across
ranks; rank 0 writes what the model produced to <output_dir>/work/<role>.json for the launching process
to score.

Every rank holds a whole copy of the model (data parallel, no ZeRO sharding): evaluation keeps no
gradients or optimizer state, so a model that trains on a device evaluates on it several times over.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ftcluster.config import apply_schema
from ftcluster.data.rows import read_rows
from ftcluster.data.template import apply_template_override
from ftcluster.eval.generate import generate_answers
from ftcluster.train.evaluation import mean_token_loss
from ftcluster.train.model import load_model
from ftcluster.train.tokenizer import load_tokenizer
from ftcluster.util import dist
from ftcluster.util.quiet import quiet_libraries


def eval_worker(payload: dict) -> None:
    """The launcher's entry: plain data in (the resolved config, the models, the prepared data), files out."""
    quiet_libraries()
    cfg = apply_schema(payload["config"])
    work = Path(payload["output_dir"]) / "work"
    for model in payload["models"]:
        result = score_model(cfg, model)
        if dist.rank() == 0:
            work.mkdir(parents=True, exist_ok=True)
            (work / f"{model['role']}.json").write_text(json.dumps(result, ensure_ascii=False))
        dist.barrier()


def eval_tokenizer(cfg: DictConfig, model_dir: str, adapter_dir: str | None):
    """The tokenizer saved with the adapter when there is one, else the model's; with data.chat_template
    applied as training applied it (so a base model renders prompts as its tuned version saw them)."""
    source = adapter_dir if adapter_dir and Path(adapter_dir, "tokenizer_config.json").is_file() else model_dir
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    if cfg.data.format != "text":
        apply_template_override(tokenizer, cfg.data.chat_template)
    return tokenizer


@torch.no_grad()
def score_model(cfg: DictConfig, spec: dict) -> dict:
    data_dir = Path(spec["data_dir"])
    tokenizer = eval_tokenizer(cfg, spec["model_dir"], spec["adapter_dir"])
    model = _load(cfg, spec["model_dir"], spec["adapter_dir"])
    started = time.perf_counter()
    general = spec["general_dir"] and Path(spec["general_dir"])
    result = {"loss": _perplexity_loss(cfg, model, data_dir / "eval", spec["pad_id"]),
              "general_loss": _perplexity_loss(cfg, model, general, spec["pad_id"]) if general else None}
    scored = time.perf_counter()
    prompts = [json.loads(line)["prompt"] for line in (data_dir / "eval_generate.jsonl").read_text(encoding="utf-8").split("\n")
               if line.strip()] if cfg.eval.metrics else []
    if dist.rank() == 0:  # decoding is the long part: say it has started
        print(f"[ftcluster] eval {spec['role']}: perplexity scored in {scored - started:.0f} s; generating "
              f"{len(prompts)} answers", flush=True)
    result["predictions"] = generate_answers(model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                             batch_size=cfg.eval.batch_size, synced=False) if prompts else []
    result["seconds"] = {"perplexity": round(scored - started, 3), "generate": round(time.perf_counter() - scored, 3)}
    del model
    gc.collect()  # before the next model loads
    return result


def _perplexity_loss(cfg: DictConfig, model, rows_dir: Path, pad_id: int) -> float | None:
    """Mean loss per scored token of a prepared split (eval, general), None when there is none."""
    if not rows_dir.is_dir():
        return None
    rows = read_rows(rows_dir)
    return mean_token_loss(model, rows, cfg.trainer.micro_batch_per_device, dist.rank(), dist.world_size(), pad_id,
                           cfg.data.packing, cfg.trainer.loss_chunk_tokens)


def _load(cfg: DictConfig, model_dir: str, adapter_dir: str | None) -> torch.nn.Module:
    model = load_model(cfg, model_dir, trainable=False)
    if adapter_dir:
        from peft import PeftModel  # not at the top: peft's import takes seconds, and whole models do without it

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return model.to(dist.device())
