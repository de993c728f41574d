"""A single-process, plain-torch training loop: the reference distributed runs must match.

It reads the same prepared rows (the run's output_dir/data) in the same global batches, starts from
the same initial weights (output_dir/init_model), and takes one AdamW step per global batch on the
mean loss over its label tokens. No DeepSpeed, no Ray, no accumulation, no process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ftcluster.config import load_run_config
from ftcluster.data.loader import GlobalBatchLoader
from ftcluster.data.rows import read_rows
from ftcluster.train.engine import lr_multiplier


@dataclass
class Reference:
    losses: list[float]
    grad_norms: list[float]  # each step's global gradient norm before clipping
    model: torch.nn.Module


def reference_run(run_dir: str | Path, steps: int | None = None) -> Reference:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "init_model", dtype=torch.float32)
    model.config.use_cache = False  # with a cache, transformers does not detect packed sequences
    if cfg.peft.method != "none":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.seed)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.peft.r, lora_alpha=cfg.peft.alpha,
                                                 lora_dropout=0.0, target_modules=list(cfg.peft.target_modules),
                                                 use_dora=cfg.peft.method == "dora"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg))
    rows = read_rows(run_dir / "data" / "train")
    g = cfg.trainer.global_batch
    loader = GlobalBatchLoader(rows, g, g, 0, 1, cfg.seed, cfg.data.shuffle, 0, cfg.data.packing)
    losses, norms = [], []
    for step in range(steps or cfg.trainer.max_steps):
        (batch,) = loader.micro_batches(step)
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, cfg.strategy.gradient_clipping).item())
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return Reference(losses, norms, model)
