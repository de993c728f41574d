"""Which rows each rank reads at each step: a pure function of the step, so resume is exact.

Epoch e reads the rows in a permutation seeded by (seed, e); global step s is the (s mod steps_per_epoch)-th
run of `global_batch` rows in it. Each rank takes its contiguous share of those rows and splits it into
gradient-accumulation micro-batches. Nothing depends on what was read before, so a resumed run (or one
resumed on a different number of workers with the same global_batch) reads exactly the rows an
uninterrupted run would. The `len(rows) % global_batch` rows left over at an epoch's end are skipped for
that epoch; the next permutation skips others.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator

import numpy as np
import torch

from ftcluster.data.collate import collate, collate_pairs
from ftcluster.data.rows import PreparedRows, require_rows
from ftcluster.data.template import IGNORE
from ftcluster.errors import ConfigError, UserError


class GlobalBatchLoader:
    def __init__(self, rows: PreparedRows, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 seed: int, shuffle: bool, pad_id: int, packed: bool):
        per_step = micro_batch * world_size
        assert global_batch % per_step == 0, "ftcluster.config.derive refuses such batch sizes before launch"
        self.rows, self.global_batch, self.micro_batch = rows, global_batch, micro_batch
        self.rank, self.seed, self.shuffle = rank, seed, shuffle
        self.pad_id, self.packed = pad_id, packed
        self.accum_steps = global_batch // per_step
        require_rows(len(rows), global_batch, rows.location)
        self.steps_per_epoch = len(rows) // global_batch
        self.rows_digest = _lengths_digest(rows)
        self._epoch, self._order = -1, []
        # Preference pairs (stage=rm, stage=dpo) are their own layout: both sides in one row.
        self.collate = ((lambda batch: collate_pairs(batch, pad_id)) if is_pairs(rows)
                        else (lambda batch: collate(batch, pad_id, packed)))

    def global_rows(self, step: int) -> list[int]:
        """Row indices of the whole global batch of `step`, as any rank (or a one-process reference) sees it."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._order_of(epoch)[index * self.global_batch:(index + 1) * self.global_batch]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's gradient-accumulation micro-batches for global step `step` (0-based)."""
        share = self.micro_batch * self.accum_steps
        mine = self.global_rows(step)[self.rank * share:(self.rank + 1) * share]
        return [self.collate(_fetch(self.rows, mine[k:k + self.micro_batch])) for k in range(0, share, self.micro_batch)]

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            n = len(self.rows)
            # numpy's SeedSequence mixes (seed, epoch) into independent, platform-stable streams.
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n).tolist() if self.shuffle
                           else list(range(n)))
            self._epoch = epoch
        return self._order

    def state_dict(self, step: int) -> dict:
        """Where `step` is in the data, plus what must not change for a resume to read the same rows."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "index_in_epoch": index, "num_rows": len(self.rows),
                "rows_digest": self.rows_digest, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch": self.global_batch}

    def check_state(self, state: dict) -> None:
        """Refuse a resume whose data or batch settings differ from the checkpoint's."""
        settings = {"global_batch": "trainer.global_batch", "seed": "seed", "shuffle": "data.shuffle"}
        for key, config_key in settings.items():
            if state.get(key) != getattr(self, key):
                raise ConfigError(config_key, f"the checkpoint was trained with {config_key}={state.get(key)}, now "
                                              f"{getattr(self, key)}; a resume must read the same batches. Set it "
                                              f"back, or start a new run in a fresh output_dir")
        if state.get("num_rows") != len(self.rows) or state.get("rows_digest") != self.rows_digest:
            raise UserError(f"the training data changed since the checkpoint ({state.get('num_rows')} rows then, "
                            f"{len(self.rows)} now, or rows of other lengths): the data files, tokenizer, "
                            f"trainer.max_seq_len or a data.* setting differ. Restore them to resume, or start a new "
                            f"run in a fresh output_dir")


def is_pairs(rows: PreparedRows) -> bool:
    return "chosen_input_ids" in rows.column_names


def eval_batches(rows: PreparedRows, micro_batch: int, rank: int, world_size: int, pad_id: int,
                 packed: bool) -> Iterator[dict]:
    """This rank's share of the eval rows (rows rank::world_size) in micro-batches.

    Every rank yields the same number of batches, because a ZeRO-3 forward gathers parameters
    collectively and a rank that stopped early would hang the others. A rank with fewer rows pads with
    a batch that counts nothing: labels all ignored, or (pairs) num_examples 0, which pair metrics
    weigh by. Sum over what a batch counts; never average per batch.
    """
    if len(rows) == 0:
        return
    mine = list(range(rank, len(rows), world_size))
    count = math.ceil(math.ceil(len(rows) / world_size) / micro_batch)
    for k in range(count):
        chunk = mine[k * micro_batch:(k + 1) * micro_batch]
        batch_rows = _fetch(rows, chunk or [0])
        if is_pairs(rows):
            batch = collate_pairs(batch_rows, pad_id)
            if not chunk:
                batch["num_examples"] = torch.tensor(0)
            yield batch
            continue
        if not chunk:
            batch_rows[0].update(labels=[IGNORE] * len(batch_rows[0]["labels"]), num_examples=0)
        yield collate(batch_rows, pad_id, packed)


def _fetch(rows: PreparedRows, indices: list[int]) -> list[dict]:
    return [{"row_index": index, **row} for index, row in zip(indices, rows.take(indices))]


def _lengths_digest(rows: PreparedRows) -> str:
    # Row lengths change with nearly any change to data, tokenizer or packing, and read cheaply
    # from the Arrow column without touching the tokens.
    h = hashlib.sha256()
    columns = [c for c in ("input_ids", "chosen_input_ids", "rejected_input_ids", "prompt_ids") if c in rows.column_names]
    for column in columns:
        h.update(rows.list_lengths(column).tobytes())
    return h.hexdigest()[:16]
