"""`ftcluster data validate`: every record checked against its format, every bad one reported.

Training stops at the first bad record; before a long run a user wants the whole list at once. The checks
are training's own (formats.to_example), so a file that validates is a file training reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ftcluster.data.formats import EXPECTS, read_records, to_example
from ftcluster.errors import DataError

# The fields that give a format away, most specific first: a preference record has a prompt too, and an
# alpaca record may carry a text field.
_TELLTALE_FIELDS = (
    ("chat", ("messages",)),
    ("chat", ("conversations",)),
    ("preference", ("chosen", "rejected")),
    ("alpaca", ("instruction", "output")),
    ("text", ("text",)),
    ("prompt", ("prompt",)),
)


@dataclass
class Validation:
    path: str
    format: str | None
    guessed_from: tuple[str, ...] | None  # the fields the format was guessed from; None when it was given
    records: int = 0
    errors: list[DataError] = field(default_factory=list)


def guess_format(record: dict) -> tuple[str, tuple[str, ...]] | None:
    """The format whose telltale fields the record has, and those fields."""
    for fmt, fields in _TELLTALE_FIELDS:
        if all(record.get(name) is not None for name in fields):
            return fmt, fields
    return None


def majority_format(path: str, records: list[tuple[int, dict]]) -> tuple[str, tuple[str, ...]]:
    """The format most records' fields point to (one odd record should not decide), and its fields."""
    votes = Counter(guess for _, record in records if (guess := guess_format(record)) is not None)
    if not votes:
        raise DataError(path, records[0][0], "cannot tell the format from the fields; pass --format with one of: "
                                             + "; ".join(f"{f} ({fields})" for f, fields in EXPECTS.items()))
    return votes.most_common(1)[0][0]


def validate(path: str, fmt: str | None = None) -> Validation:
    """Check every record of `path` as format `fmt`, or as the format most records' fields point to."""
    unreadable: list[DataError] = []
    records = list(read_records(path, on_error=unreadable.append))
    if not records and not unreadable:
        raise DataError(path, None, "the file holds no records")
    guessed_from = None
    if fmt is None and records:
        fmt, guessed_from = majority_format(path, records)
    report = Validation(path, fmt, guessed_from, records=len(records) + len(unreadable), errors=unreadable)
    for line, record in records:
        try:
            to_example(record, fmt, path, line)
        except DataError as exc:
            report.errors.append(exc)
    report.errors.sort(key=lambda exc: exc.line or 0)
    return report
