"""The DPO reference model's log-probabilities: computed once and cached on disk, or live every step.

The reference is the model before tuning: with LoRA/DoRA the policy itself with its adapters disabled
(no second copy in memory), otherwise a frozen copy sharded like the policy (ZeRO-3 partitions it).

Cached (stage.dpo.reference=cached, the default): before the first step every rank scores its share of
the training and eval pairs, rank 0 writes the sums to <cache>/reference_logps/<key>/ (atomically), and
the frozen copy, if one was built, is freed: no reference model lives during training. The key covers
the reference weights, the prepared data (files, tokenizer, chat template, max length, truncation) and
the precision and attention kernel, so every later epoch, resumed attempt and run on the same model
and data reuses it, and any change computes a new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ftcluster.data.loader import eval_batches
from ftcluster.objectives.logprobs import pair_logps
from ftcluster.objectives.losses import SequenceLogps
from ftcluster.train import engine as ds_engine
from ftcluster.util.cache import cache_root
from ftcluster.train.model import load_model
from ftcluster.util import atomic, dist

LAYOUT = 1
_SAMPLE = 1 << 20  # bytes read from each end of a weight file for its fingerprint


class ReferenceLogps:
    """`logps(batch)` gives the reference's SequenceLogps for a pair batch, from the cache or a forward."""

    def __init__(self, ctx, cached: bool):
        self.ctx, self.cached = ctx, cached
        self.forward_batches = 0
        self.cache_hit = False
        self._tables: dict[str, dict[str, torch.Tensor]] = {}
        self._frozen = None
        if cached:
            self.key = cache_key(ctx)
            root = ctx.cfg.stage.dpo.reference_cache_dir
            self.folder = (Path(root) if root else cache_root() / "reference_logps") / self.key
            # Rank 0 alone looks at the cache and tells the others: a cache on its node's disk still works,
            # and every rank takes the same path (computing is collective under ZeRO-3).
            loaded = dist.broadcast_object(self._load() if ctx.rank == 0 else None)
            self.cache_hit = loaded is not None
            self._tables = _on_device(loaded if loaded is not None else self._compute())
        elif ctx.cfg.peft.method == "none":
            self._frozen = _frozen_copy(ctx)

    def logps(self, batch: dict, split: str = "train") -> SequenceLogps:
        if self.cached:
            # The tables are on the policy's device already: only the batch's row numbers cross (without
            # waiting for the queued kernels), and the lookup runs there.
            table, rows = self._tables[split], batch["row_index"].to(dist.device(), non_blocking=True)
            return SequenceLogps(table["chosen"][rows], table["rejected"][rows], table["chosen_tokens"][rows],
                                 table["rejected_tokens"][rows])
        return self._forward(batch)

    @torch.no_grad()
    def _forward(self, batch: dict) -> SequenceLogps:
        self.forward_batches += 1
        if self._frozen is not None:
            return _detached(pair_logps(self._frozen, batch, self.ctx.cfg.trainer.loss_chunk_tokens))
        engine = self.ctx.engine
        was_training = engine.training
        engine.eval()  # no dropout: the reference is deterministic
        try:
            with engine.module.disable_adapter():
                return _detached(pair_logps(engine, batch, self.ctx.cfg.trainer.loss_chunk_tokens))
        finally:
            engine.train(was_training)

    def _load(self) -> dict | None:
        if not (self.folder / "meta.json").is_file():
            return None
        tables = {split: load_file(path) for split in ("train", "eval")
                  if (path := self.folder / f"{split}.safetensors").is_file()}
        expected = {"train": len(self.ctx.loader.rows), "eval": len(self.ctx.eval_rows or [])}
        if any(len(table["chosen"]) != expected[split] for split, table in tables.items()):
            return None  # a key collision cannot happen by chance; a truncated write is refused anyway
        return tables

    def _compute(self) -> dict:
        ctx = self.ctx
        pairs = len(ctx.loader.rows) + (len(ctx.eval_rows) if ctx.eval_rows is not None else 0)
        ctx.tracker.message(f"computing the reference log-probs of {pairs} pairs once, for {self.folder}")
        if ctx.cfg.peft.method == "none":
            self._frozen = _frozen_copy(ctx)
        tables = {"train": self._score(ctx.loader.rows)}
        if ctx.eval_rows is not None:
            tables["eval"] = self._score(ctx.eval_rows)
        self._frozen = None  # freed before training starts: no reference model lives beside the policy
        if ctx.rank == 0:
            _write(self.folder, tables, {"key": self.key, "model_dir": ctx.model_dir,
                                         "rows": {s: len(t["chosen"]) for s, t in tables.items()}})
        dist.barrier()
        return tables

    def _score(self, rows) -> dict[str, torch.Tensor]:
        """Every rank scores rows rank::world_size (as many batches each: ZeRO-3 forwards are collectives);
        the parts are gathered so that every rank holds the whole table."""
        ctx = self.ctx
        mine: dict[int, tuple] = {}
        for batch in eval_batches(rows, ctx.cfg.trainer.micro_batch_per_device, ctx.rank, ctx.world_size,
                                  ctx.pad_id, packed=False):
            out = self._forward(batch)
            if int(batch["num_examples"]) == 0:
                continue  # a filler batch that keeps ranks in step
            # One trip to the host per batch; float64 holds the float32 sums and the token counts exactly.
            values = dist.to_host(torch.stack([out.chosen.double(), out.rejected.double(), out.chosen_tokens.double(),
                                               out.rejected_tokens.double()], dim=1)).tolist()
            for row, row_values in zip(batch["row_index"].tolist(), values):
                mine[row] = tuple(row_values)
        merged: dict[int, tuple] = {}
        for part in dist.all_gather_objects(mine):
            merged.update(part)
        values = torch.tensor([merged[i] for i in range(len(rows))], dtype=torch.float64)
        return {"chosen": values[:, 0].float(), "rejected": values[:, 1].float(),
                "chosen_tokens": values[:, 2].long(), "rejected_tokens": values[:, 3].long()}


def _on_device(tables: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """The tables moved once to the policy's device, where its log-probs are: 24 bytes a pair (24 MB for a
    million pairs), against a host-to-device copy in every micro-batch."""
    return {split: {name: values.to(dist.device()) for name, values in table.items()} for split, table in tables.items()}


def _detached(logps: SequenceLogps) -> SequenceLogps:
    return SequenceLogps(logps.chosen.detach().float(), logps.rejected.detach().float(), logps.chosen_tokens,
                         logps.rejected_tokens)


def _frozen_copy(ctx):
    """The base model, frozen, sharded like the policy (a ZeRO-3 inference engine under ZeRO-3)."""
    with ds_engine.zero3_construction(ctx.ds_config):
        model = load_model(ctx.cfg, ctx.model_dir, trainable=False)
    return ds_engine.initialize_frozen(model, ctx.ds_config)


def cache_key(ctx) -> str:
    data_stats = json.loads((Path(ctx.cfg.output_dir) / "data" / "stats.json").read_text())
    h = hashlib.sha256()
    h.update(json.dumps({"layout": LAYOUT, "data": data_stats["fingerprint"],
                         "precision": ctx.cfg.strategy.precision,
                         "attention": ctx.cfg.model.attn_implementation}, sort_keys=True).encode())
    h.update(model_fingerprint(ctx.model_dir).encode())
    return h.hexdigest()[:24]


def model_fingerprint(model_dir: str) -> str:
    """Config plus, per weight file, its size and its first and last MiB: any retrained or re-initialised
    weights change it, and a 100 GB model is fingerprinted in milliseconds."""
    folder = Path(model_dir)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(_SAMPLE))
            f.seek(max(0, size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    return h.hexdigest()



def _write(folder: Path, tables: dict, meta: dict) -> None:
    # Runs that share the cache take no lock: one that computed the same key first keeps its (equal) tables.
    with atomic.publishing(folder) as tmp:
        for split, table in tables.items():
            save_file({k: v.contiguous() for k, v in table.items()}, str(tmp / f"{split}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
