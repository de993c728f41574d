"""Preparing the sets that stay small and in memory: preference pairs and RL prompts, one row each (no
packing), and the records `ftcluster eval` and `ftcluster data split` read whole. Sequence sets (SFT) stream
through the prepare workers instead (prepare.py).
"""

from __future__ import annotations

import random

from ftcluster.data import pairs, prompts
from ftcluster.data.formats import read_records, to_example
from ftcluster.data.sources import resolve
from ftcluster.data.splits import explain_drops
from ftcluster.data.template import IGNORE
from ftcluster.errors import DataError, UserError


def small_rows(kind: str, name: str, items: list, cfg, tokenizer) -> tuple[list[dict], dict, list]:
    """(rows, counts, kept eval examples) of a pairs or prompts split."""
    return {"pairs": _pair_rows, "prompts": _prompt_rows}[kind](name, items, cfg, tokenizer)


def _pair_rows(name: str, items: list, cfg, tokenizer) -> tuple[list[dict], dict, list]:
    """One row per preference pair; an over-long pair is truncated (both sides), dropped or refused."""
    max_len, policy = cfg.trainer.max_seq_len, cfg.data.truncation
    rows, kept, truncated, too_long, no_target = [], [], 0, 0, 0
    for path, line, example in items:
        row = _at(path, line, pairs.encode_pair, example, tokenizer)
        cut = _over_length(path, line, pairs.pair_length(row), max_len, policy, "pair (its longer side)")
        if cut and policy == "drop":
            too_long += 1
            continue
        row = pairs.truncate_pair(row, max_len)
        if not pairs.has_both_responses(row):
            no_target += 1
            continue
        truncated += cut
        rows.append(row)
        kept.append({"messages": example["prompt"] + example["chosen"]})  # generation eval: the chosen answer
    reasons = {"too_long": too_long, "no_trainable_tokens": no_target}
    _require_some(name, items, rows, reasons, max_len)
    sides = [row[f"{side}_{what}"] for row in rows for side in pairs.SIDES for what in ("input_ids", "labels")]
    return rows, {"records": len(items), "examples": len(rows), "rows": len(rows), "truncated": truncated,
                  "dropped": too_long + no_target, "dropped_reasons": reasons,
                  "tokens": sum(len(s) for s in sides[0::2]),
                  "trainable_tokens": sum(label != IGNORE for s in sides[1::2] for label in s)}, \
        kept if name == "eval" else []


def _prompt_rows(name: str, items: list, cfg, tokenizer) -> tuple[list[dict], dict, list]:
    """One row per prompt. A prompt that leaves no room for stage.rl.max_new_tokens within
    trainer.max_seq_len cannot be cut without losing its generation prompt: dropped or refused."""
    room = cfg.trainer.max_seq_len - cfg.stage.rl.max_new_tokens
    rows, too_long = [], 0
    for path, line, example in items:
        row = _at(path, line, prompts.encode_prompt_row, prompts.as_prompt(example), tokenizer)
        if len(row["prompt_ids"]) > room:
            if cfg.data.truncation == "error":
                raise DataError(path, line, f"prompt is {len(row['prompt_ids'])} tokens; with stage.rl.max_new_tokens="
                                            f"{cfg.stage.rl.max_new_tokens} it must fit trainer.max_seq_len="
                                            f"{cfg.trainer.max_seq_len}. Raise trainer.max_seq_len, or set "
                                            f"data.truncation=drop")
            too_long += 1
            continue
        rows.append(row)
    reasons = {"too_long": too_long, "no_trainable_tokens": 0}
    _require_some(name, items, rows, reasons, room)
    return rows, {"records": len(items), "examples": len(rows), "rows": len(rows), "truncated": 0,
                  "dropped": too_long, "dropped_reasons": reasons,
                  "tokens": sum(len(r["prompt_ids"]) for r in rows), "trainable_tokens": 0}, []


def _at(path: str, line: int, encode, *args):
    try:
        return encode(*args)
    except UserError as exc:
        # A template that fails on one conversation is reported at that conversation.
        raise DataError(path, line, str(exc)) from None


def _require_some(name: str, items: list, rows: list, reasons: dict, max_len: int) -> None:
    if items and not rows:
        raise DataError(items[0][0], None, f"the {name} split is empty after filtering: all {len(items)} examples "
                                           f"were dropped ({explain_drops(reasons, max_len)})")


def read_splits(cfg) -> tuple[list, list | None]:
    """The (path, line, example) items of the train and eval splits (None without eval data): data.eval_path,
    or data.eval_fraction held out of data.path. `ftcluster eval` scores the same eval split."""
    data = cfg.data
    train_items = _read(data.path, cfg)
    if data.eval_path:
        return train_items, _read(data.eval_path, cfg)
    if data.eval_fraction > 0:
        return hold_out(train_items, data.eval_fraction, cfg.seed, data.path)
    return train_items, None


def _read(path, cfg) -> list[tuple[str, int, dict]]:
    """Every record of data.path (a file, list, glob or folder of shards), converted; the first bad one raises."""
    files = resolve(path, "data.path")
    items = [(file, line, to_example(record, cfg.data.format, file, line, cfg.data.system_prompt))
             for file in files for line, record in read_records(file)]
    if not items:
        raise DataError(str(path), None, "the file holds no records")
    return items


def hold_out(items: list, fraction: float, seed: int, path: str) -> tuple[list, list]:
    """A seeded split of data.path into train and eval, each kept in file order (`ftcluster data split` makes
    the same one, so a split written to disk holds out what data.eval_fraction would)."""
    n_eval = max(1, round(len(items) * fraction))
    if n_eval >= len(items):
        raise DataError(path, None, f"{len(items)} records cannot spare data.eval_fraction={fraction} for eval and "
                                    f"still train; add records, lower data.eval_fraction or set data.eval_path")
    chosen = set(random.Random(seed).sample(range(len(items)), n_eval))
    return ([x for i, x in enumerate(items) if i not in chosen],
            [x for i, x in enumerate(items) if i in chosen])


def _over_length(path: str, line: int, length: int, max_len: int, policy: str, what: str) -> bool:
    """Whether `length` tokens exceed trainer.max_seq_len; under data.truncation=error, the error."""
    if length > max_len and policy == "error":
        raise DataError(path, line, f"{what} is {length} tokens, longer than trainer.max_seq_len={max_len} "
                                    f"(data.truncation=error). Raise trainer.max_seq_len, or set "
                                    f"data.truncation=truncate or data.truncation=drop")
    return length > max_len
