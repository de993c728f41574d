"""The entry every training process runs, whoever placed it: build this rank's data, model and
engine, restore a checkpoint when resuming, and hand them to the stage.

`payload` is plain data (the resolved config and the paths the driver prepared), so any launcher
can ship it: a Ray rank actor, a spawned process, or a plain function call in tests.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ftcluster.config import apply_schema, derive
from ftcluster.data.loader import GlobalBatchLoader
from ftcluster.data.rows import read_rows
from ftcluster.data.template import apply_template_override
from ftcluster.observe import peak_memory
from ftcluster.observe.track import make_tracker, truncate_metrics
from ftcluster.observe.placement import nccl_timeout_s, summary
from ftcluster.observe.watchdog import Watchdog, gather_placement, is_timeout
from ftcluster.stages.registry import STAGES
from ftcluster.train import checkpoint, checkpoint_io
from ftcluster.train import engine as ds_engine
from ftcluster.train.context import StageContext
from ftcluster.train.model import build_loading_tables, load_model
from ftcluster.train.tokenizer import load_tokenizer
from ftcluster.util import dist
from ftcluster.util.quiet import quiet_libraries


def preload() -> None:
    """Before the payload (launch/entry.py): what the run would otherwise import or build on its first step."""
    ds_engine.import_deferred()
    build_loading_tables()


def train_worker(payload: dict) -> None:
    quiet_libraries()
    cfg = apply_schema(payload["config"])
    derived = derive(cfg)
    # Under NCCL the process group waits longer than the watchdog below, so that ftcluster names a hang
    # before NCCL aborts the ranks (observe/watchdog.py); gloo raises in Python and the worker names it.
    collective_s = cfg.launcher.collective_timeout_s
    dist.setup(timeout_s=nccl_timeout_s(collective_s) if torch.cuda.is_available() else collective_s)
    rank, world = dist.rank(), dist.world_size()
    if world != derived.world_size:
        raise RuntimeError(f"launcher started {world} processes but the config expects {derived.world_size}")
    placement = gather_placement(cfg.output_dir)
    if rank == 0:
        print(f"[ftcluster] {world} workers: {summary(placement)}; master {_master()}", flush=True)
    _seed_everything(cfg.seed)

    model_dir, data_dir = payload["model_dir"], Path(payload["data_dir"])
    data_stats = json.loads((data_dir / "stats.json").read_text())
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    if cfg.data.format != "text":
        apply_template_override(tokenizer, cfg.data.chat_template)  # evaluation and final/ use it too
    stage = STAGES[cfg.stage.name]
    if cfg.trainer.exact_cpu_memory and not torch.cuda.is_available() and not peak_memory.return_freed_memory():
        print("[ftcluster] trainer.exact_cpu_memory: this C library has no mallopt (not glibc); the resident "
              "set will also hold freed memory", flush=True)
    ds_config = ds_engine.deepspeed_config(cfg, derived)
    with ds_engine.zero3_construction(ds_config):
        model = load_model(cfg, model_dir, kind=stage.model_kind)
    engine = ds_engine.initialize(model, cfg, ds_config)
    _seed_everything(cfg.seed + rank)  # e.g. dropout masks differ per rank, as their data does

    train_rows = read_rows(data_dir / "train")
    eval_rows = read_rows(data_dir / "eval") if (data_dir / "eval").is_dir() else None
    loader = GlobalBatchLoader(train_rows, cfg.trainer.global_batch, cfg.trainer.micro_batch_per_device, rank, world,
                               cfg.seed, cfg.data.shuffle, data_stats["pad_id"], cfg.data.packing)

    start_step = 0
    resume_from = _resume_point(payload, cfg.output_dir)
    if resume_from:
        state = checkpoint_io.load(engine, Path(resume_from), exclude_frozen=cfg.peft.method != "none")
        loader.check_state(state["data"])
        start_step = state["step"]
        if rank == 0:
            truncate_metrics(cfg.output_dir, start_step)
    dist.barrier()

    tracker = make_tracker(cfg, rank, start_step, cfg.trainer.max_steps)
    watchdog = Watchdog(placement, cfg.launcher.collective_timeout_s, report_dir=cfg.output_dir)
    ctx = StageContext(cfg=cfg, engine=engine, tokenizer=tokenizer, pad_id=data_stats["pad_id"], loader=loader,
                       eval_rows=eval_rows,
                       eval_prompts=_read_prompts(data_dir / "eval_generate.jsonl"), tracker=tracker,
                       model_dir=model_dir, start_step=start_step, rank=rank, world_size=world,
                       launch_id=payload["launch_id"], watchdog=watchdog, ds_config=ds_config,
                       model_kind=stage.model_kind)
    if start_step:
        tracker.message(f"resumed from {resume_from} at step {start_step}")
    try:
        stage.entry()(ctx)
    except RuntimeError as exc:
        if is_timeout(exc):
            raise watchdog.diagnose(exc) from exc
        raise
    finally:
        watchdog.close()
        tracker.close()


def _resume_point(payload: dict, output_dir: str) -> str | None:
    """The driver's choice, unless an earlier attempt of this same launch (the launcher restarts the workers
    after a failure, up to launcher.max_failures) has written a newer checkpoint since."""
    newest = checkpoint.latest_checkpoint(output_dir)
    if newest is not None and checkpoint.read_state(newest).get("launch_id") == payload["launch_id"]:
        return str(newest)
    return payload.get("resume_from")


def _master() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _read_prompts(path: Path) -> list:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
