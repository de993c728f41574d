"""Writing a selection of a data file's records back in the file's own format, atomically.

The curation commands keep, drop or rewrite records; their output should be a file training reads exactly
like the input. JSON Lines keep each untouched line's bytes (key order, spacing, escapes), so a dedup or a
split changes nothing but which lines are there. Records are named by the `line` read_records gave them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ftcluster.data.formats import read_records
from ftcluster.errors import UserError
from ftcluster.util.atomic import replacing
from ftcluster.util.outputs import claim_files


def source_kind(path: str) -> str:
    """How `path` stores records: jsonl, json (one array), parquet or dataset (a save_to_disk folder)."""
    p = Path(path)
    if p.is_dir():
        return "dataset"
    if p.suffix == ".json":
        # The reader takes a .json file that does not open with '[' as JSON Lines (many datasets ship so).
        head = p.read_bytes().decode("utf-8-sig", errors="replace").lstrip()[:1]
        return "json" if head == "[" else "jsonl"
    return {".jsonl": "jsonl", ".parquet": "parquet"}[p.suffix]


def check_output(source: str, out: Path, option: str) -> None:
    """Refuse to write over the input, or a file whose name promises another format than the input's."""
    # Reading starts by checking that the input exists and is of a supported type: fail on that first.
    next(read_records(source), None)
    src, dest = Path(source).resolve(), out.resolve()
    if dest == src or src in dest.parents:
        raise UserError(f"{option} {out} would overwrite the input {source}; write the result somewhere else")
    if not src.is_dir() and dest.suffix != src.suffix:
        raise UserError(f"{option} {out}: the output keeps the input's format, so its name must end in "
                        f"{src.suffix} like {source}")
    if src.is_dir() and dest.exists() and not dest.is_dir():
        raise UserError(f"{option} {out} is a file; the input is a saved dataset folder, so the output is a folder")
    if dest in src.parents:
        raise UserError(f"{option} {out} would overwrite the input {source}, which it holds; write the result "
                        f"somewhere else")


def claim_output(source: str, out: Path, job: str, overwrite: bool, reports: Sequence[Path] = ()) -> None:
    """check_output, then: `out` and its `reports` are new, or `ftcluster data <job>`'s earlier output and
    `overwrite` is set (util/outputs.py; the sidecar <out>.ftcluster.json records them)."""
    check_output(source, out, "--out")
    claim_files([out, *reports], command(job), option="--out", inputs=[source], overwrite=overwrite)


def command(job: str) -> str:
    return f"ftcluster data {job}"


def write_like(source: str, out: Path, lines: Sequence[int], replaced: dict[int, dict] | None = None) -> None:
    """Write the records at `lines` of `source`, in that order, to `out` in the source's format; `replaced`
    holds new content for some of them."""
    replaced = replaced or {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        _WRITERS[source_kind(source)](source, tmp, lines, replaced)


def _write_jsonl(source: str, tmp: Path, lines: Sequence[int], replaced: dict[int, dict]) -> None:
    with open(source, "rb") as f:
        raw = dict(enumerate(f, start=1))  # numbered as the reader numbers them
    with open(tmp, "wb") as f:
        for line in lines:
            if line in replaced:
                f.write(json.dumps(replaced[line], ensure_ascii=False).encode("utf-8") + b"\n")
            else:
                # The file's last line may lack its newline; here it may no longer be last.
                f.write(raw[line] if raw[line].endswith(b"\n") else raw[line] + b"\n")


def _write_json(source: str, tmp: Path, lines: Sequence[int], replaced: dict[int, dict]) -> None:
    records = json.loads(Path(source).read_bytes().decode("utf-8-sig"))
    chosen = [replaced.get(line, records[line - 1]) for line in lines]
    tmp.write_text(json.dumps(chosen, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _write_parquet(source: str, tmp: Path, lines: Sequence[int], replaced: dict[int, dict]) -> None:
    # not at the top (here and in _write_dataset): `ftcluster data` on JSON files does without pyarrow and datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source).take([line - 1 for line in lines])
    if replaced:
        rows = [replaced.get(line, row) for line, row in zip(lines, table.to_pylist())]
        table = pa.Table.from_pylist(rows, schema=table.schema)
    pq.write_table(table, tmp)


def _write_dataset(source: str, tmp: Path, lines: Sequence[int], replaced: dict[int, dict]) -> None:
    import datasets  # see _write_parquet

    from ftcluster.data.prepare import quiet_datasets  # imports torch too

    ds = datasets.load_from_disk(source).select([line - 1 for line in lines])
    if replaced:
        rows = [replaced.get(line, row) for line, row in zip(lines, ds)]
        ds = datasets.Dataset.from_list(rows, features=ds.features)
    with quiet_datasets():
        ds.save_to_disk(str(tmp))


_WRITERS = {"jsonl": _write_jsonl, "json": _write_json, "parquet": _write_parquet, "dataset": _write_dataset}
