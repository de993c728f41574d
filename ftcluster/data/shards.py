"""One unit of records in, one shard of encoded examples out, plus the summary the driver packs from.

A shard is an Arrow IPC file (`shards/<unit>.arrow`, uncompressed, so the row assembly memory-maps it and
reads only the examples it needs) with one entry per kept example: its record's position in the unit, its
input_ids and labels, and, for eval examples, the prompt and reference of generation-based evaluation.
The summary carries lengths and counts only, never tokens: the driver's memory grows with the number of
examples (a few bytes each), not with their tokens.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ftcluster.data.encode import Encoded, Settings, encode_records
from ftcluster.data.sources import Unit, read_unit
from ftcluster.errors import DataError

SCHEMA = pa.schema([("position", pa.int32()), ("input_ids", pa.list_(pa.int32())),
                    ("labels", pa.list_(pa.int32())), ("generate", pa.string())])
# Records encoded together: one tokenizer call each.
BATCH_RECORDS = 256
# Bad records a unit reports in full; the driver shows the first ones in file order and counts the rest.
ERRORS_PER_UNIT = 20


@dataclass
class Summary:
    unit: int
    records: int = 0
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # kept examples' records
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    trainable: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    dropped: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))  # (record, reason)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, the whole message), first ones
    error_count: int = 0
    path: str = ""


def shard_path(shards: Path, unit: int) -> Path:
    return shards / f"{unit:07d}.arrow"


def encode_unit(unit: Unit, settings: Settings, tokenizer, shards: Path) -> Summary:
    """Read, encode and write one unit; the shard appears complete (renamed into place) or not at all."""
    summary = Summary(unit.index, path=unit.path)
    parts: list[Encoded] = []
    errors: list[DataError] = []
    final = shard_path(shards, unit.index)
    # Private to this writer: the driver and an encoder may both encode a unit (parallel.encode_units), alike.
    tmp = final.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{final.name}")
    batch: list[tuple[int, int, dict]] = []
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        def flush():
            encoded = encode_records(batch, unit.path, unit.format, settings, tokenizer, unit.keep_generate)
            errors.extend(encoded.errors)
            if encoded.kept and not errors:  # once a record is bad nothing trains: stop writing tokens
                writer.write_batch(_record_batch(encoded))
            parts.append(_without_tokens(encoded))
            batch.clear()

        for line, record in read_unit(unit, errors.append):
            batch.append((summary.records, line, record))
            summary.records += 1
            if len(batch) == BATCH_RECORDS:
                flush()
        if batch:
            flush()
    tmp.replace(final)
    errors.sort(key=lambda e: e.line or 0)
    summary.error_count = len(errors)
    summary.errors = [(e.line or 0, str(e)) for e in errors[:ERRORS_PER_UNIT]]
    _fill(summary, parts)
    return summary


def _record_batch(encoded: Encoded) -> pa.RecordBatch:
    return pa.record_batch([pa.array(encoded.kept, pa.int32()), _lists(encoded.ids), _lists(encoded.labels),
                            pa.array(encoded.generate, pa.string())], schema=SCHEMA)


def _lists(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def _without_tokens(encoded: Encoded) -> Encoded:
    """What the summary needs of a batch; its tokens are in the shard already."""
    lengths = [len(ids) for ids in encoded.ids]
    trainable = [int((labels != -100).sum()) for labels in encoded.labels]
    return Encoded(kept=encoded.kept, ids=lengths, labels=trainable, truncated=encoded.truncated,
                   dropped=encoded.dropped)


def _fill(summary: Summary, parts: list[Encoded]) -> None:
    summary.positions = np.array([p for part in parts for p in part.kept], dtype=np.int32)
    summary.lengths = np.array([n for part in parts for n in part.ids], dtype=np.int32)
    summary.trainable = np.array([n for part in parts for n in part.labels], dtype=np.int32)
    summary.truncated = np.array([t for part in parts for t in part.truncated], dtype=bool)
    summary.dropped = np.array([d for part in parts for d in part.dropped], dtype=np.int32).reshape(-1, 2)
