"""The prepared rows as workers read them: a split's Arrow files, memory-mapped with pyarrow alone.

A prepared split is the folder layout `datasets.save_to_disk` writes (assemble.py writes the same): Arrow
stream files named in its state.json. Reading it needs a memory map and row slices, which pyarrow does; the
`datasets` library (pandas under it) cost every rank about a second of CPU at start-up to do the same. The
reads below also keep to the pyarrow calls that do not import pandas (Table.take and to_numpy do: 0.6 s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ftcluster.errors import DataError


class PreparedRows:
    """`table`'s rows, where `location` (a folder, or what the rows are, for messages) says they came from."""

    def __init__(self, table: pa.Table, location: str):
        self.table, self.location = table, location

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def take(self, indices: list[int]) -> list[dict]:
        """The rows at `indices`, in that order."""
        return [self[index] for index in indices]

    def __getitem__(self, index: int) -> dict:
        return self.table.slice(index, 1).to_pylist()[0]

    def list_lengths(self, column: str) -> np.ndarray:
        """Each row's number of items in the list column `column` (int64), read from the Arrow offsets without
        touching the items."""
        lengths = pc.list_value_length(self.table[column])  # int32, or int64 for a large_list column
        dtype, width = (np.int64, 8) if lengths.type == pa.int64() else (np.int32, 4)
        chunks = [np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk), offset=chunk.offset * width)
                  for chunk in lengths.chunks if len(chunk)]
        return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.to_batches():
            yield from batch.to_pylist()


def read_rows(folder: Path | str) -> PreparedRows:
    """The split in `folder`, its files memory-mapped (zero-copy: the rows stay in the page cache, shared by
    every rank on the node) and concatenated in the order state.json lists them."""
    folder = Path(folder)
    files = [folder / f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    tables = [pa.ipc.open_stream(pa.memory_map(str(path))).read_all() for path in files]
    return PreparedRows(pa.concat_tables(tables), str(folder))


def require_rows(num_rows: int, global_batch: int, where: str) -> None:
    """One global batch needs `global_batch` distinct rows; fewer would make an epoch zero steps long."""
    if num_rows < global_batch:
        raise DataError(where, None,
                        f"the training split has {num_rows} rows (packed sequences when data.packing=true), fewer "
                        f"than trainer.global_batch={global_batch}; trainer.global_batch must be at most {num_rows}. "
                        f"Lower it, add data, or set data.packing=false for one row per example")
