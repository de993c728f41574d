"""`ftcluster data dedup`: exact and near-duplicate records removed, the first occurrence kept.

Exact: the same normalised text (case, punctuation and spacing folded; see curate/text.py). Near: MinHash
LSH (datasketch) over word shingles finds candidates whose estimated Jaccard similarity reaches the
threshold; the candidate's MinHash estimate is then checked against the threshold, since LSH alone also
returns pairs somewhat below it. A record is compared with the records kept so far, so what is removed
is always a later copy of something still in the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from datasketch import MinHash, MinHashLSH

from ftcluster.data.tools.text import fingerprint, ngrams, words
from ftcluster.errors import UserError

# Instruction data is short: with 5-word shingles one changed word in a 40-word record already drops the
# similarity to ~0.76, with 3-word ones to ~0.85, so 3 keeps "the same record, lightly edited" near.
SHINGLE_WORDS = 3
NUM_PERM = 128
SEED = 1  # fixed, so the same file always loses the same records


@dataclass(frozen=True)
class Duplicate:
    line: int  # the record removed
    of: int  # the kept record it duplicates
    kind: str  # "exact" or "near"
    similarity: float  # 1.0 for exact; the MinHash Jaccard estimate for near


@dataclass
class Dedup:
    records: int = 0
    kept: list[int] = field(default_factory=list)
    removed: list[Duplicate] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        exact = sum(d.kind == "exact" for d in self.removed)
        return {"records": self.records, "exact": exact, "near": len(self.removed) - exact, "kept": len(self.kept)}


def find_duplicates(records: Iterable[tuple[int, dict]], near_threshold: float = 0.85) -> Dedup:
    """Which of `(line, record)` to keep, and which later records duplicate which kept ones."""
    if not 0 < near_threshold <= 1:
        raise UserError(f"--near-threshold {near_threshold}: it must be a Jaccard similarity in (0, 1], e.g. 0.85")
    result = Dedup()
    first_by_text: dict[str, int] = {}
    lsh = MinHashLSH(threshold=near_threshold, num_perm=NUM_PERM)
    signatures: dict[int, MinHash] = {}
    for line, record in records:
        result.records += 1
        tokens = words(record)
        text_hash = fingerprint(tokens)
        if text_hash in first_by_text:
            result.removed.append(Duplicate(line, first_by_text[text_hash], "exact", 1.0))
            continue
        first_by_text[text_hash] = line
        if tokens:
            signature = _minhash(tokens)
            near = _closest(signature, lsh.query(signature), signatures, near_threshold)
            if near is not None:
                result.removed.append(Duplicate(line, near[0], "near", round(near[1], 3)))
                continue
            lsh.insert(line, signature)
            signatures[line] = signature
        result.kept.append(line)
    return result


def _minhash(tokens: list[str]) -> MinHash:
    signature = MinHash(num_perm=NUM_PERM, seed=SEED)
    signature.update_batch([" ".join(gram).encode("utf-8") for gram in ngrams(tokens, SHINGLE_WORDS)])
    return signature


def _closest(signature: MinHash, candidates: list[int], signatures: dict[int, MinHash],
             threshold: float) -> tuple[int, float] | None:
    """The most similar kept candidate at or above the threshold (the earliest among equals)."""
    scored = [(signature.jaccard(signatures[line]), -line) for line in candidates]
    scored = [(sim, neg) for sim, neg in scored if sim >= threshold]
    if not scored:
        return None
    sim, neg = max(scored)
    return -neg, sim
