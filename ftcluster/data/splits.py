"""From the units' summaries to each split's examples, in order: the held-out eval records, the mixture's
weighting, and the counts the report and stats.json show. Lengths and counts only; tokens stay in the shards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ftcluster.data.assemble import Examples
from ftcluster.data.encode import NO_TARGET, TOO_LONG
from ftcluster.data.shards import Summary
from ftcluster.data.sources import Source, Unit
from ftcluster.errors import DataError

# Bad records listed in the error before "... and N more" (as `ftcluster data validate` lists them).
SHOWN_ERRORS = 20


@dataclass
class Split:
    """Every example of a split's records in record order, and what happened to each record."""

    examples: Examples
    records: np.ndarray  # int64: each example's record, numbered across the split
    trainable: np.ndarray
    truncated: np.ndarray
    source: np.ndarray  # int32: each example's source
    dropped: np.ndarray  # (record, reason) of each record left out
    record_count: int
    first_path: str

    def select(self, order: np.ndarray) -> "Split":
        return Split(self.examples.take(order), self.records[order], self.trainable[order], self.truncated[order],
                     self.source[order], self.dropped, self.record_count, self.first_path)


def raise_errors(summaries: dict[int, Summary]) -> None:
    """Every bad record, in file order (units are in file order, lines within them); the first ones listed."""
    count = sum(s.error_count for s in summaries.values())
    if not count:
        return
    messages = [m for unit in sorted(summaries) for _, m in summaries[unit].errors][:SHOWN_ERRORS]
    first = min((u for u in summaries if summaries[u].errors))
    path, line = summaries[first].path, summaries[first].errors[0][0]
    head = messages[0].split(": ", 1)[1] if messages[0].startswith(f"{path}:") else messages[0]
    more = ""
    if count > 1:
        more = (f"\n{count} bad records in all; nothing was prepared or trained. The first ones:\n"
                + "\n".join(messages) + (f"\n... and {count - len(messages)} more" if count > len(messages) else "")
                + "\n`ftcluster data validate FILE` lists every one")
    raise DataError(path, line or None, head + more)


def gather(split: str, units: list[Unit], sources: list[Source], summaries: dict[int, Summary]) -> Split:
    """The split's examples in record order; a source whose files hold no record at all is refused."""
    mine = [u for u in units if u.split == split]
    records_before, offset = {}, 0
    for unit in mine:
        records_before[unit.index] = offset
        offset += summaries[unit.index].records
    for s, source in enumerate(sources):
        if not sum(summaries[u.index].records for u in mine if u.source == s):
            raise DataError(source.spec, None, "the file holds no records" if len(source.files) == 1
                            else f"the {len(source.files)} files hold no records")
    parts = [summaries[u.index] for u in mine]
    sizes = [len(p.positions) for p in parts]
    examples = Examples(np.repeat([u.index for u in mine], sizes).astype(np.int32),
                        np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]),
                        np.concatenate([p.lengths for p in parts]).astype(np.int32))
    records = np.concatenate([p.positions.astype(np.int64) + records_before[p.unit] for p in parts])
    dropped = np.concatenate([p.dropped.astype(np.int64) + [records_before[p.unit], 0] for p in parts]).reshape(-1, 2)
    return Split(examples, records, np.concatenate([p.trainable for p in parts]),
                 np.concatenate([p.truncated for p in parts]),
                 np.repeat([u.source for u in mine], sizes).astype(np.int32), dropped, offset, mine[0].path)


def hold_out(split: Split, fraction: float, seed: int, where: str) -> tuple[Split, Split]:
    """data.eval_fraction of the records, chosen as prepare.hold_out chooses them, into an eval split."""
    n = split.record_count
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(where, None, f"{n} records cannot spare data.eval_fraction={fraction} for eval and still "
                                     f"train; add records, lower data.eval_fraction or set data.eval_path")
    chosen = np.zeros(n, dtype=bool)
    chosen[random.Random(seed).sample(range(n), n_eval)] = True
    is_eval = chosen[split.records]
    dropped_eval = chosen[split.dropped[:, 0]]
    train, evals = split.select(np.flatnonzero(~is_eval)), split.select(np.flatnonzero(is_eval))
    train.dropped, evals.dropped = split.dropped[~dropped_eval], split.dropped[dropped_eval]
    train.record_count, evals.record_count = n - n_eval, n_eval
    return train, evals


def weigh(split: Split, sources: list[Source], seed: int) -> Split:
    """A mixture's sampling weights: source s contributes round(weight * its examples), whole copies first,
    then a seeded sample of the rest; sources follow one another in their order. Weights of 1: unchanged."""
    if all(s.weight == 1.0 for s in sources):
        return split
    order = []
    for s, source in enumerate(sources):
        mine = np.flatnonzero(split.source == s)
        want = round(source.weight * len(mine))
        copies, rest = divmod(want, len(mine)) if len(mine) else (0, 0)
        order.extend(np.tile(mine, copies).tolist())
        order.extend(sorted(random.Random(f"{seed}/{s}").sample(mine.tolist(), rest)))
    return split.select(np.asarray(order, dtype=np.int64))


def counts(split: Split) -> dict:
    reasons = {"too_long": int((split.dropped[:, 1] == TOO_LONG).sum()),
               "no_trainable_tokens": int((split.dropped[:, 1] == NO_TARGET).sum())}
    return {"records": split.record_count, "examples": len(split.records), "truncated": int(split.truncated.sum()),
            "dropped": int(len(split.dropped)), "dropped_reasons": reasons,
            "tokens": int(split.examples.lengths.astype(np.int64).sum()),
            "trainable_tokens": int(split.trainable.astype(np.int64).sum())}


def proportions(split: Split, sources: list[Source]) -> list[dict]:
    """What each source makes of the split once weighed: the mixture as realised, not as asked."""
    total = max(1, len(split.records))
    return [{"path": source.spec, "format": source.format, "weight": source.weight,
             "examples": int((split.source == s).sum()),
             "proportion": round(float((split.source == s).sum()) / total, 4)} for s, source in enumerate(sources)]


def require_some(name: str, split: Split, max_len: int) -> None:
    if split.record_count and not len(split.records):
        reasons = counts(split)["dropped_reasons"]
        raise DataError(split.first_path, None, f"the {name} split is empty after filtering: all "
                                                f"{split.record_count} examples were dropped "
                                                f"({explain_drops(reasons, max_len)})")


def explain_drops(reasons: dict, max_len: int) -> str:
    """Why examples were dropped, with the fix for each reason (too_long, no_trainable_tokens counts)."""
    parts = []
    if reasons["too_long"]:
        parts.append(f"{reasons['too_long']} longer than trainer.max_seq_len={max_len} with data.truncation=drop; "
                     f"raise trainer.max_seq_len or use data.truncation=truncate")
    if reasons["no_trainable_tokens"]:
        parts.append(f"{reasons['no_trainable_tokens']} with no trainable token left (the prompt fills "
                     f"trainer.max_seq_len={max_len}); raise trainer.max_seq_len")
    return "; ".join(parts)
