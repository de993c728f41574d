"""Packed (or one-example) rows from the shards, written as a saved Hugging Face dataset, a file per chunk.

Packing runs on the driver from token lengths alone (packing.pack_order, the best-fit decreasing `pack`
uses). The rows are then cut into chunks of CHUNK_ROWS, and each chunk is built and written on its own: its
examples read from the memory-mapped shards, concatenated, written as one Arrow file of the dataset, and the
maps released, so a writer holds one chunk's tokens, whatever the size of the set. With a Ray cluster
connected the chunks are written by Ray tasks in parallel (the shards and the set are on storage every node
reads, as the encoders' are) when there are enough of them to repay starting the tasks' workers; else by a few
threads of this process (WRITER_THREADS). Either way the files, and the rows' digest (one per chunk, combined
in chunk order), depend only on the examples' order: never on how the shards were cut, nor on how many
processes or threads wrote the chunks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow as pa

from ftcluster.data.packing import pack_order
from ftcluster.data.shards import shard_path
from ftcluster.data.template import IGNORE

# Rows per chunk, and so per file: bounds the tokens a process holds (2048 rows of 2048 tokens: 48 MB).
CHUNK_ROWS = 2048
# Fewer chunks than this are written by the driver even with a cluster: one core writes a chunk in about
# 0.15 s, and Ray's task workers take seconds to start and import (measured on 2 cores, 40k chats in 6 chunks:
# 0.75 s in this process against 2.8 s as tasks; 160k chats in 24 chunks: 4.9 s against 5.2 s).
PARALLEL_MIN_CHUNKS = 32
# Threads writing chunks in this process, each holding one chunk's tokens (some 100 MB at most).
WRITER_THREADS = 4


@dataclass
class Examples:
    """A split's examples in order: which shard entry holds each, and its length."""

    units: np.ndarray  # int32: the unit (shard) of each example
    entries: np.ndarray  # int32: its index in that shard
    lengths: np.ndarray  # int32

    def take(self, order: np.ndarray) -> "Examples":
        return Examples(self.units[order], self.entries[order], self.lengths[order])


def write_rows(examples: Examples, shards: Path, where: Path, features: datasets.Features, max_seq_len: int,
               packed: bool, parallel: bool = False) -> tuple[int, int, str]:
    """Write the split's rows to `where` (a datasets.load_from_disk folder); (rows, tokens, rows_digest).
    `parallel`: write the chunks as tasks on the connected Ray cluster (from PARALLEL_MIN_CHUNKS chunks)."""
    members = (pack_order(examples.lengths, max_seq_len) if packed
               else [[i] for i in range(len(examples.lengths))])
    where.mkdir(parents=True)
    count = max(1, -(-len(members) // CHUNK_ROWS))
    names = [f"data-{k:05d}-of-{count:05d}.arrow" for k in range(count)]
    # Each chunk's examples, in row order (a few numbers each: what a task is sent), and their count per row.
    schema, chunks = features.arrow_schema, []
    for k in range(count):
        rows = members[k * CHUNK_ROWS:(k + 1) * CHUNK_ROWS]
        sizes = np.fromiter((len(row) for row in rows), dtype=np.int32, count=len(rows))
        order = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(sizes.sum()))
        chunks.append((examples.take(order), sizes, str(shards), str(where / names[k]), schema))
    if parallel and count >= max(2, PARALLEL_MIN_CHUNKS):
        import ray  # not at the top: the workers and a one-process prepare run without Ray

        write = ray.remote(num_cpus=1)(write_chunk)
        digests = ray.get([write.remote(*chunk) for chunk in chunks])
    else:
        # Threads: gathering, writing and hashing a chunk run in numpy, Arrow and hashlib with the GIL released.
        with ThreadPoolExecutor(max_workers=min(len(chunks), WRITER_THREADS, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda chunk: write_chunk(*chunk), chunks))
    _describe(where, features, names)
    return len(members), int(examples.lengths.sum()), _combined(digests)


def write_chunk(part: Examples, sizes: np.ndarray, shards: str, path: str, schema: pa.Schema) -> str:
    """Build one chunk's rows (`sizes`: the examples of each row, `part`: those examples in order) and write them
    to `path` as an Arrow stream, the layout datasets.load_from_disk maps; the chunk's digest. A task on Ray."""
    table = _rows_table(sizes, part, Path(shards), schema)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    return _Digest(table).hexdigest()


def generate_lines(examples: Examples, shards: Path) -> Iterator[str]:
    """The eval_generate.jsonl line of each example that has one, in example order."""
    for start in range(0, len(examples.units), CHUNK_ROWS * 4):
        part = examples.take(np.arange(start, min(start + CHUNK_ROWS * 4, len(examples.units))))
        with _Shards(shards) as open_shards:
            for unit, entry in zip(part.units.tolist(), part.entries.tolist()):
                line = open_shards.column(unit, "generate")[entry].as_py()
                if line is not None:
                    yield line


class _Buffers(threading.local):
    """The token columns of a chunk, allocated once for all the chunks a thread writes: memory first touched
    costs far more than memory reused (on a virtual machine most of all), and a chunk's arrays are as large as
    its rows. Each thread has its own, freed with the thread."""

    def __init__(self):
        self.ids = self.labels = np.empty(0, dtype=np.int32)

    def take(self, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        if tokens > len(self.ids):  # grown to the largest chunk so far
            self.ids, self.labels = (np.empty(tokens, dtype=np.int32) for _ in range(2))
        return self.ids[:tokens], self.labels[:tokens]


# The driver's writer threads' (gone after each split); a Ray task worker's last while the worker does.
_BUFFERS = _Buffers()


def _rows_table(sizes: np.ndarray, part: Examples, shards: Path, schema: pa.Schema) -> pa.Table:
    """The chunk's rows, its examples' tokens gathered shard by shard with array indexing (no Python step per
    example: at a million examples that loop was most of the serial time), into this process's buffers (the
    table shares their memory)."""
    lengths = part.lengths.astype(np.int64)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)  # where each example begins in the chunk's tokens
    np.cumsum(lengths, out=starts[1:])
    ids, labels = _BUFFERS.take(int(starts[-1]))
    by_unit = np.argsort(part.units, kind="stable")
    with _Shards(shards) as open_shards:
        for group in np.split(by_unit, np.flatnonzero(np.diff(part.units[by_unit])) + 1):
            if len(group):
                unit = int(part.units[group[0]])
                open_shards.gather(unit, part.entries[group], starts[group], ids, labels)
                # Unmapped at once: packing takes a chunk's examples from every shard (longest first), and with
                # an example or two per page, a chunk touches nearly every page of every shard. Kept mapped until
                # the chunk ends, they would all count in this process's resident memory: the whole data set.
                open_shards.release(unit)
    # The first token of an example is never a target (packing._row): the previous example's last token would
    # otherwise learn to predict it.
    labels[starts[:-1]] = IGNORE
    bounds = np.zeros(len(sizes) + 1, dtype=np.int64)  # where each row begins in the chunk's examples
    np.cumsum(sizes, out=bounds[1:])
    offsets = pa.array(starts[bounds].astype(np.int32))
    columns = {name: pa.ListArray.from_arrays(offsets, pa.array(values, pa.int32()))
               for name, values in (("input_ids", ids), ("labels", labels))}
    columns["example_lengths"] = pa.ListArray.from_arrays(pa.array(bounds.astype(np.int32)),
                                                          pa.array(lengths.astype(np.int32)))
    columns["num_examples"] = pa.array(sizes.astype(np.int32), pa.int32())
    return pa.Table.from_pydict(columns, schema=schema)


def _ranges(begins: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions begins[k] .. begins[k] + lengths[k] - 1 of every k, one after the other."""
    ends_before = np.cumsum(lengths) - lengths
    return np.repeat(begins - ends_before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


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

    def release(self, unit: int) -> None:
        self.tables.pop(unit, None)

    def gather(self, unit: int, entries: np.ndarray, out_starts: np.ndarray, ids: np.ndarray,
               labels: np.ndarray) -> None:
        """Copy the tokens and labels of the unit's `entries` into ids and labels, each at its out_starts. A shard
        holds one record batch per batch of records encoded (shards.BATCH_RECORDS): entries are found batch by batch."""
        ids_column, labels_column = self.column(unit, "input_ids"), self.column(unit, "labels")
        ends = np.cumsum([len(c) for c in ids_column.chunks])
        batch_of = np.searchsorted(ends, entries, side="right")
        for batch in np.unique(batch_of).tolist():
            mine = batch_of == batch
            ids_list, labels_list = ids_column.chunk(batch), labels_column.chunk(batch)
            local = entries[mine] - (ends[batch] - len(ids_list))
            # Offsets index the batch's values; labels were written with the same lengths (shards._record_batch).
            offsets = ids_list.offsets.to_numpy().astype(np.int64)
            lengths = offsets[local + 1] - offsets[local]
            take, put = _ranges(offsets[local], lengths), _ranges(out_starts[mine], lengths)
            ids[put] = ids_list.values.to_numpy()[take]
            labels[put] = labels_list.values.to_numpy()[take]


class _Digest:
    """sha256 of one chunk's rows: lengths, tokens, labels, the examples' lengths and counts, each its own stream."""

    def __init__(self, table: pa.Table):
        self.parts = {name: hashlib.sha256() for name in ("lengths", "input_ids", "labels", "example_lengths",
                                                           "num_examples")}
        # The values are hashed where they lie (no copies as large as the chunk).
        ids = table.column("input_ids").combine_chunks()
        self.parts["lengths"].update(np.diff(ids.offsets.to_numpy()).astype(np.int64).tobytes())
        self.parts["input_ids"].update(_int32(ids.values))
        labels = table.column("labels").combine_chunks()
        self.parts["labels"].update(_int32(labels.values))
        # Where the examples begin: the same tokens split otherwise would train differently.
        self.parts["example_lengths"].update(_int32(table.column("example_lengths").combine_chunks().values))
        self.parts["num_examples"].update(table.column("num_examples").to_numpy().astype(np.int32).tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256("".join(h.hexdigest() for h in self.parts.values()).encode()).hexdigest()


def _combined(chunk_digests: list[str]) -> str:
    """rows_digest: the chunks' digests in order (chunks of CHUNK_ROWS rows, however many processes wrote them)."""
    return hashlib.sha256("".join(chunk_digests).encode()).hexdigest()


def _int32(values: pa.Array) -> np.ndarray:
    return np.ascontiguousarray(values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False))


def rows_digest(rows: list[dict]) -> str:
    """The same digest, of rows held in memory (the small preference and prompt sets)."""
    if not rows or "input_ids" not in rows[0]:
        h = hashlib.sha256()
        for row in rows:
            h.update(json.dumps(row, sort_keys=True).encode())
        return h.hexdigest()
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("example_lengths", pa.list_(pa.int32())), ("num_examples", pa.int32())])
    return _combined([_Digest(pa.table({key: [row[key] for row in rows[start:start + CHUNK_ROWS]]
                                        for key in schema.names}, schema=schema)).hexdigest()
                      for start in range(0, len(rows), CHUNK_ROWS)])


def _describe(where: Path, features: datasets.Features, files: list[str]) -> None:
    """The two files datasets.save_to_disk writes beside its Arrow files, so load_from_disk reads ours."""
    datasets.DatasetInfo(features=features).write_to_directory(str(where))
    state = {"_data_files": [{"filename": name} for name in files],
             "_fingerprint": hashlib.sha256(str(where).encode()).hexdigest()[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (where / "state.json").write_text(json.dumps(state, indent=2))
