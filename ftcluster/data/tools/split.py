"""`ftcluster data split`: a seeded train/eval split written as two files in the input's format.

The held-out records are chosen by training's own hold-out (data/prepare.py hold_out), so
`data split --eval-fraction F --seed S` writes the very eval set that `ftcluster train data.eval_fraction=F
seed=S` would hold out of the same file. Each side keeps file order and, for JSON Lines, each line's bytes.
"""

from __future__ import annotations

from pathlib import Path

from ftcluster.data.tools.output import check_output, write_like
from ftcluster.data.formats import read_records
from ftcluster.data.prepare import hold_out
from ftcluster.errors import DataError, UserError


def split_paths(source: str, out_dir: Path) -> dict[str, Path]:
    """out_dir/train.jsonl and out_dir/eval.jsonl (the input's extension; folders for a saved dataset)."""
    suffix = "" if Path(source).is_dir() else Path(source).suffix
    return {name: out_dir / f"{name}{suffix}" for name in ("train", "eval")}


def split(source: str, eval_fraction: float, seed: int, out_dir: Path) -> dict[str, tuple[Path, int]]:
    """Write both sides; return each side's path and record count."""
    if not 0 < eval_fraction < 1:
        raise UserError(f"--eval-fraction {eval_fraction}: it must be a fraction in (0, 1), e.g. 0.1")
    paths = split_paths(source, out_dir)
    for path in paths.values():
        check_output(source, path, "--out")
    lines = [line for line, _ in read_records(source)]
    if not lines:
        raise DataError(source, None, "the file holds no records")
    try:
        sides = dict(zip(("train", "eval"), hold_out(lines, eval_fraction, seed, source)))
    except DataError:
        raise DataError(source, None, f"{len(lines)} records cannot spare --eval-fraction {eval_fraction} for eval "
                                      f"and keep some for training; lower it or add records") from None
    for name, chosen in sides.items():
        write_like(source, paths[name], chosen)
    return {name: (paths[name], len(sides[name])) for name in sides}
