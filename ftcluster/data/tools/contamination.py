"""`ftcluster data contamination`: eval examples whose text is already in the training data.

Two checks, on normalised words (curate/text.py): an exact match of the whole text, and word n-gram overlap
(13-grams by default, the GPT-3 paper's test): the share of an eval example's n-grams that occur anywhere in
train. Text every record shares (a fixed instruction or system prompt) is no evidence of a leak, yet it
would give every eval example a large share: n-grams found in at least TEMPLATE_SHARE of the training
records are therefore left out of both sides of the share. An eval example with no n-gram left (shorter
than n words, or nothing but template) gets the exact check only.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from ftcluster.data.tools.text import fingerprint, ngrams, words
from ftcluster.errors import UserError

# An n-gram in at least this share of the training records (and in two at least) is template, not content.
TEMPLATE_SHARE = 0.1


@dataclass(frozen=True)
class Overlap:
    eval_line: int
    train_line: int  # the exact copy, or the train record where most of the shared n-grams first occur
    kind: str  # "exact" or "ngram"
    overlap: float  # the share of the eval example's n-grams found in train (1.0 for exact)


@dataclass
class Contamination:
    eval_records: int = 0
    unchecked: int = 0  # eval examples with no n-gram outside the template: exact check only
    overlaps: list[Overlap] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.overlaps) / self.eval_records if self.eval_records else 0.0


def find_contamination(train: Iterable[tuple[int, dict]], eval_records: Iterable[tuple[int, dict]], n: int = 13,
                       threshold: float = 0.5) -> Contamination:
    """Which eval records (by line) overlap train, exactly or in at least `threshold` of their n-grams."""
    if n < 1:
        raise UserError(f"--ngram {n}: it must be a positive number of words")
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: it must be a share of n-grams in (0, 1], e.g. 0.5")
    first_by_text: dict[str, int] = {}
    first_by_gram: dict[int, int] = {}  # hash of an n-gram -> the first train line holding it
    records_with: Counter = Counter()  # hash of an n-gram -> how many train records hold it
    train_records = 0
    for line, record in train:
        train_records += 1
        tokens = words(record)
        first_by_text.setdefault(fingerprint(tokens), line)
        if len(tokens) >= n:
            for gram in {hash(gram) for gram in ngrams(tokens, n)}:
                first_by_gram.setdefault(gram, line)
                records_with[gram] += 1
    template = max(2, math.ceil(TEMPLATE_SHARE * train_records))

    result = Contamination()
    for line, record in eval_records:
        result.eval_records += 1
        tokens = words(record)
        if fingerprint(tokens) in first_by_text:
            result.overlaps.append(Overlap(line, first_by_text[fingerprint(tokens)], "exact", 1.0))
            continue
        grams = {hash(gram) for gram in ngrams(tokens, n)} if len(tokens) >= n else set()
        grams = {g for g in grams if records_with[g] < template}
        if not grams:
            result.unchecked += 1
            continue
        found = [first_by_gram[g] for g in grams if g in first_by_gram]
        share = len(found) / len(grams)
        if found and share >= threshold:
            # Ties go to the earliest train line, so the report does not depend on set order.
            best = max(Counter(found).items(), key=lambda item: (item[1], -item[0]))[0]
            result.overlaps.append(Overlap(line, best, "ngram", round(share, 3)))
    return result
