"""Where a split's records come from, and how they are cut into units of work.

`data.path` (or `data.eval_path`) may be one file, a list of files, a glob or a folder of shards; `data.sources`
is a mixture of such paths, each with its own format and sampling weight. Every path resolves to files in a
fixed order (sorted), so the records, and with them the prepared rows, never depend on the file system's
listing order.

A unit is a piece of one file that one prepare worker reads and encodes on its own: a byte range of plain
JSON Lines (cut at line starts, so its first line number is known), one Parquet row group, or a whole file
that cannot be cut (compressed JSON Lines, a .json list, a saved dataset). Units are numbered in file order;
that number, not the worker that ran it, decides where its examples go.
"""

from __future__ import annotations

import glob
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ftcluster.data.formats import COMPRESSED, parse_line, read_records
from ftcluster.errors import ConfigError, DataError

# Records per unit of plain JSON Lines: small enough that two workers share a few thousand records evenly,
# large enough that per-unit overhead (a task, a shard file) stays small next to the encoding.
UNIT_LINES = 512
_SHARD_SUFFIXES = (".jsonl", ".json", ".parquet", *COMPRESSED)


@dataclass(frozen=True)
class Source:
    """One data set of a split: its files in order, its format and its sampling weight."""

    spec: str  # as the user wrote it, for messages and the report
    files: tuple[str, ...]
    format: str
    weight: float = 1.0


@dataclass(frozen=True)
class Unit:
    index: int  # position in file order across the whole preparation: where its examples go
    split: str  # "train" or "eval"
    source: int  # index into the split's sources
    path: str
    format: str
    kind: str  # "lines" (a byte range of JSON Lines), "row_group" (Parquet) or "file"
    start: int = 0  # lines: byte offset; row_group: the group's number
    stop: int = 0  # lines: byte offset (exclusive)
    first_line: int = 1
    keep_generate: bool = False  # also keep each chat's prompt and reference (eval_generate.jsonl)


def split_sources(data, split: str) -> list[Source] | None:
    """The sources of `split` ("train": data.sources or data.path; "eval": data.eval_path); None when unset."""
    if split == "train" and data.get("sources"):
        return [Source(_spec_text(s["path"]), tuple(resolve(s["path"], f"data.sources[{i}].path")),
                       s.get("format") or data.format, float(s.get("weight", 1.0)))
                for i, s in enumerate(data.sources)]
    spec = data.path if split == "train" else data.eval_path
    if not spec:
        return None
    key = "data.path" if split == "train" else "data.eval_path"
    return [Source(_spec_text(spec), tuple(resolve(spec, key)), data.format)]


def _spec_text(spec) -> str:
    return spec if isinstance(spec, str) else ", ".join(map(str, spec))


def resolve(spec, key: str) -> list[str]:
    """The files a path setting names: a file, a saved-dataset folder, a folder of shards, a glob, or a list."""
    if not isinstance(spec, str):
        files = [f for item in spec for f in resolve(str(item), key)]
        if not files:
            raise ConfigError(key, "the list names no file")
        return files
    if glob.has_magic(spec):
        matches = sorted(m for m in glob.glob(spec, recursive=True) if Path(m).is_file())
        if not matches:
            raise DataError(spec, None, "no file matches this pattern")
        return matches
    path = Path(spec)
    if not path.exists():
        raise DataError(spec, None, "file does not exist")
    if path.is_dir() and not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        shards = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(_SHARD_SUFFIXES))
        if not shards:
            raise DataError(spec, None, f"the folder holds no data files ({', '.join(_SHARD_SUFFIXES)}) and is not a "
                                        f"folder written by datasets.Dataset.save_to_disk")
        return shards
    return [spec]


def units(split: str, sources: list[Source], first_index: int, keep_generate: bool) -> list[Unit]:
    """The units of a split's files, in order, numbered from `first_index`."""
    out: list[Unit] = []
    for s, source in enumerate(sources):
        for path in source.files:
            for kind, start, stop, first_line in _pieces(path):
                out.append(Unit(first_index + len(out), split, s, path, source.format, kind, start, stop, first_line,
                                keep_generate))
    return out


def unit_count_up_to(sources: list[Source], limit: int) -> int:
    """How many units `sources` cut into, counted no further than `limit` (cheap: a large file is not read
    to its end)."""
    pieces = (piece for source in sources for path in source.files for piece in _pieces(path))
    return sum(1 for _ in itertools.islice(pieces, limit))


def _pieces(path: str) -> Iterator[tuple[str, int, int, int]]:
    if path.endswith(".jsonl"):
        yield from _line_ranges(path)
    elif path.endswith(".parquet"):
        yield from ((("row_group", g, g + 1, 1)) for g in range(_row_groups(path)))
    else:
        yield "file", 0, 0, 1


def _line_ranges(path: str) -> Iterator[tuple[str, int, int, int]]:
    """Byte ranges of UNIT_LINES lines each, found by counting newlines (no JSON is parsed here)."""
    start, line, offset, in_range = 0, 1, 0, 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            while in_range + len(newlines) >= UNIT_LINES:
                cut = newlines[UNIT_LINES - in_range - 1]
                stop = offset + int(cut) + 1
                yield "lines", start, stop, line
                line += UNIT_LINES
                start = stop
                newlines = newlines[UNIT_LINES - in_range:]
                in_range = 0
            in_range += len(newlines)
            offset += len(chunk)
    if offset > start or start == 0:
        yield "lines", start, offset, line


def _row_groups(path: str) -> int:
    import pyarrow.parquet as pq

    try:
        return max(1, pq.ParquetFile(path).num_row_groups)
    except Exception:  # a damaged file: one unit, whose reading reports it as read_records does
        return 1


def read_unit(unit: Unit, on_error: Callable[[DataError], None]) -> Iterator[tuple[int, dict]]:
    """`(line, record)` of one unit, in order; a bad record goes to `on_error` and reading goes on."""
    if unit.kind == "lines":
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            data = f.read(unit.stop - unit.start)
        for line, raw in enumerate(data.splitlines(keepends=True), start=unit.first_line):
            try:
                record = parse_line(raw, unit.path, line)
            except DataError as exc:
                on_error(exc)
                continue
            if record is not None:
                yield line, record
    else:
        try:
            yield from (_read_row_group(unit) if unit.kind == "row_group" else read_records(unit.path, on_error))
        except DataError as exc:  # a file that cannot be read at all (damaged, unknown type)
            on_error(exc)


def _read_row_group(unit: Unit) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    if unit.start == 0:
        # The first group reads through read_records, which reports a damaged file as it always has.
        groups = pq.ParquetFile(unit.path).num_row_groups if Path(unit.path).stat().st_size else 0
        if groups <= 1:
            yield from read_records(unit.path)
            return
    parquet = pq.ParquetFile(unit.path)
    first = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start)) + 1
    for index, record in enumerate(parquet.read_row_group(unit.start).to_pylist(), start=first):
        yield index, record

