"""Packed (or one-example) rows from the shards, written as a saved Hugging Face dataset in one streaming pass.

Packing runs on the driver from token lengths alone (packing.pack_order, the best-fit decreasing `pack`
uses). The rows are then built a chunk at a time: the chunk's examples are read from the memory-mapped
shards, concatenated, written, and the maps released, so memory holds one chunk's tokens, whatever the size
of the set. The rows, and their digest, depend only on the examples' order, never on how the shards were cut.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow as pa

from ftcluster.data.packing import pack_order
from ftcluster.data.shards import shard_path
from ftcluster.data.template import IGNORE

ARROW_FILE = "data-00000-of-00001.arrow"
# Rows built per pass over the shards: bounds the tokens in memory (2048 rows of 2048 tokens: 48 MB).
CHUNK_ROWS = 2048


@dataclass
class Examples:
    """A split's examples in order: which shard entry holds each, and its length."""

    units: np.ndarray  # int32: the unit (shard) of each example
    entries: np.ndarray  # int32: its index in that shard
    lengths: np.ndarray  # int32

    def take(self, order: np.ndarray) -> "Examples":
        return Examples(self.units[order], self.entries[order], self.lengths[order])


def write_rows(examples: Examples, shards: Path, where: Path, features: datasets.Features, max_seq_len: int,
               packed: bool) -> tuple[int, int, str]:
    """Write the split's rows to `where` (a datasets.load_from_disk folder); (rows, tokens, rows_digest)."""
    members = (pack_order(examples.lengths, max_seq_len) if packed
               else [[i] for i in range(len(examples.lengths))])
    where.mkdir(parents=True)
    digest = _Digest()
    with datasets.arrow_writer.ArrowWriter(features=features, path=str(where / ARROW_FILE)) as writer:
        for start in range(0, len(members), CHUNK_ROWS):
            chunk = members[start:start + CHUNK_ROWS]
            table = _rows_table(chunk, examples, shards)
            digest.update(table)
            writer.write_table(table)
        writer.finalize()
    _describe(where, features)
    return len(members), int(examples.lengths.sum()), digest.hexdigest()


def generate_lines(examples: Examples, shards: Path) -> Iterator[str]:
    """The eval_generate.jsonl line of each example that has one, in example order."""
    for start in range(0, len(examples.units), CHUNK_ROWS * 4):
        part = examples.take(np.arange(start, min(start + CHUNK_ROWS * 4, len(examples.units))))
        with _Shards(shards) as open_shards:
            for unit, entry in zip(part.units.tolist(), part.entries.tolist()):
                line = open_shards.column(unit, "generate")[entry].as_py()
                if line is not None:
                    yield line


def _rows_table(chunk: list[list[int]], examples: Examples, shards: Path) -> pa.Table:
    ids_parts, label_parts, position_parts, row_lengths = [], [], [], []
    with _Shards(shards) as open_shards:
        for row in chunk:
            length = 0
            for i in row:
                ids, labels = open_shards.example(int(examples.units[i]), int(examples.entries[i]))
                labels = labels.copy()
                # The first token of an example is never a target (packing._row): the previous example's last
                # token would otherwise learn to predict it.
                labels[0] = IGNORE
                ids_parts.append(ids)
                label_parts.append(labels)
                position_parts.append(np.arange(len(ids), dtype=np.int32))
                length += len(ids)
            row_lengths.append(length)
        offsets = np.zeros(len(chunk) + 1, dtype=np.int32)
        np.cumsum(row_lengths, out=offsets[1:])
        columns = {name: pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(parts), pa.int32()))
                   for name, parts in (("input_ids", ids_parts), ("labels", label_parts),
                                       ("position_ids", position_parts))}
    columns["num_examples"] = pa.array([len(row) for row in chunk], pa.int32())
    return pa.table(columns)


class _Shards:
    """Memory-mapped shards, opened on first use and all unmapped on leaving the block."""

    def __init__(self, folder: Path):
        self.folder, self.tables = folder, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tables.clear()

    def column(self, unit: int, name: str):
        if unit not in self.tables:
            source = pa.memory_map(str(shard_path(self.folder, unit)))
            self.tables[unit] = pa.ipc.open_file(source).read_all()
        return self.tables[unit].column(name)

    def example(self, unit: int, entry: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.column(unit, name)[entry].values.to_numpy(zero_copy_only=False)
                     for name in ("input_ids", "labels"))


class _Digest:
    """sha256 of the rows in order: lengths, tokens, labels and example counts, each its own stream, so the
    digest is the same however the rows were cut into chunks."""

    def __init__(self):
        self.parts = {name: hashlib.sha256() for name in ("lengths", "input_ids", "labels", "num_examples")}

    def update(self, table: pa.Table) -> None:
        ids = table.column("input_ids").combine_chunks()
        self.parts["lengths"].update(np.diff(ids.offsets.to_numpy()).astype(np.int64).tobytes())
        self.parts["input_ids"].update(ids.values.to_numpy().astype(np.int32).tobytes())
        labels = table.column("labels").combine_chunks()
        self.parts["labels"].update(labels.values.to_numpy().astype(np.int32).tobytes())
        self.parts["num_examples"].update(table.column("num_examples").to_numpy().astype(np.int32).tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256("".join(h.hexdigest() for h in self.parts.values()).encode()).hexdigest()


def rows_digest(rows: list[dict]) -> str:
    """The same digest, of rows held in memory (the small preference and prompt sets)."""
    digest = _Digest()
    if rows and "input_ids" in rows[0]:
        digest.update(pa.table({key: [row[key] for row in rows] for key in
                                ("input_ids", "labels", "num_examples")},
                               schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                                                 ("num_examples", pa.int32())])))
    else:
        h = hashlib.sha256()
        for row in rows:
            h.update(json.dumps(row, sort_keys=True).encode())
        return h.hexdigest()
    return digest.hexdigest()


def _describe(where: Path, features: datasets.Features) -> None:
    """The two files datasets.save_to_disk writes beside its Arrow file, so load_from_disk reads ours."""
    datasets.DatasetInfo(features=features).write_to_directory(str(where))
    state = {"_data_files": [{"filename": ARROW_FILE}], "_fingerprint": hashlib.sha256(str(where).encode()).hexdigest()[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (where / "state.json").write_text(json.dumps(state, indent=2))
