"""The text of a record as the curation checks compare it: every string in it, normalised to words.

Dedup and contamination work on records of any format, so they look at all of a record's string values
(nested turns included) rather than at the fields of one format. Normalisation folds case, Unicode forms,
punctuation and whitespace, so that copies differing only in those count as the same text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any, Iterator

_NON_WORD = re.compile(r"[\W_]+")


def strings(value: Any) -> Iterator[str]:
    """Every string in a record, in field order, depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings(item)


def words(record: dict) -> list[str]:
    """The record's text as lower-case words, punctuation dropped."""
    text = unicodedata.normalize("NFKC", "\n".join(strings(record))).casefold()
    return _NON_WORD.sub(" ", text).split()


def fingerprint(tokens: list[str]) -> str:
    """A hash of the normalised text: records with the same fingerprint are exact duplicates."""
    return hashlib.sha256(" ".join(tokens).encode("utf-8")).hexdigest()


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words is one shorter gram, so that it still has a shingle."""
    if len(tokens) <= n:
        return [tuple(tokens)] if tokens else []
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
