"""Turn the configured data files into encoded, packed, memory-mappable splits, once, before any worker.

Every data problem a user can have (a bad record, an over-long example under truncation=error, a split
that filtering empties) is raised here, in the launching process, as one DataError naming file and line.
Workers only memory-map the result. The output is keyed by a fingerprint of everything that shapes it,
so an unchanged relaunch (or a resume) reuses it and a changed one never does.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import datasets
from filelock import FileLock

from ftcluster.data import pairs, prompts
from ftcluster.data.formats import read_records, to_example
from ftcluster.data.loader import require_rows
from ftcluster.data.packing import pack, packing_efficiency, unpacked
from ftcluster.data.template import (IGNORE, apply_template_override, encode_chat, encode_text,
                                     prompt_and_reference)
from ftcluster.errors import DataError, UserError
from ftcluster.stages.registry import STAGES
from ftcluster.util import atomic

# Bump when the encoding or the layout on disk changes, so older prepared sets are not reused.
LAYOUT_VERSION = 2

# What each stage trains on: token sequences (SFT), preference pairs (reward model, DPO family) or
# prompts to generate from (PPO, GRPO).

FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "position_ids": datasets.List(datasets.Value("int32")),
    "num_examples": datasets.Value("int32"),
})


def prepare(cfg, tokenizer, out_dir: str) -> dict:
    """Write out_dir/{train,eval,eval_generate.jsonl,stats.json}; return the stats. eval: with eval data only."""
    data = cfg.data
    if data.format != "text":
        apply_template_override(tokenizer, data.chat_template)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".prepare.lock")):
        fingerprint = _fingerprint(cfg, tokenizer)
        cached = _prepared(out, fingerprint)
        if cached is not None:
            return cached
        (out / "stats.json").unlink(missing_ok=True)  # stats.json last written = set complete.

        train_items, eval_items = read_splits(cfg)
        kind = STAGES[cfg.stage.name].data_kind
        stats = {"fingerprint": fingerprint, "format": data.format, "kind": kind, "packed": kind == "sequences"
                 and bool(data.packing), "max_seq_len": cfg.trainer.max_seq_len, "pad_id": _pad_id(tokenizer),
                 "eval_generate": 0}
        # Without eval data there is no eval/ folder, no eval_generate.jsonl and no "eval" in the stats:
        # the trainer skips evaluation rather than reporting a loss over nothing.
        _remove(out / "eval", out / "eval_generate.jsonl")
        for name, items in (("train", train_items), ("eval", eval_items)):
            if items is None:
                continue
            rows, counts, kept = _ROWS[kind](name, items, cfg, tokenizer)
            if name == "train":
                # Checked here too, so the launch fails before any worker starts.
                require_rows(len(rows), _rows_per_step(cfg), data.path)
            _save_rows(rows, out / name, _FEATURES[kind])
            stats[name] = counts
            if kept:
                stats["eval_generate"] = _write_eval_generate(kept, out / "eval_generate.jsonl")
        atomic.write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


def _rows_per_step(cfg) -> int:
    return cfg.stage.rl.prompts_per_step if STAGES[cfg.stage.name].data_kind == "prompts" else cfg.trainer.global_batch


def _sequence_rows(name: str, items: list, cfg, tokenizer) -> tuple[list[dict], dict, list[dict]]:
    encoded, kept, counts = _encode_split(name, items, cfg, tokenizer)
    rows = pack(encoded, cfg.trainer.max_seq_len) if cfg.data.packing else unpacked(encoded)
    counts.update(rows=len(rows), packing_efficiency=round(packing_efficiency(rows, cfg.trainer.max_seq_len), 4))
    return rows, counts, kept if name == "eval" else []


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


# Per kind: (rows, counts, the eval examples kept for generation-based evaluation) and the row layout.
_ROWS = {"sequences": _sequence_rows, "pairs": _pair_rows, "prompts": _prompt_rows}
_FEATURES = {"sequences": FEATURES, "pairs": pairs.FEATURES, "prompts": prompts.FEATURES}


def _at(path: str, line: int, encode, *args):
    try:
        return encode(*args)
    except UserError as exc:
        # A template that fails on one conversation is reported at that conversation.
        raise DataError(path, line, str(exc)) from None


def _require_some(name: str, items: list, rows: list, reasons: dict, max_len: int) -> None:
    if items and not rows:
        raise DataError(items[0][0], None, f"the {name} split is empty after filtering: all {len(items)} examples "
                                           f"were dropped ({_explain(reasons, max_len)})")


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


def _read(path: str, cfg) -> list[tuple[str, int, dict]]:
    items = [(path, line, to_example(record, cfg.data.format, path, line, cfg.data.system_prompt))
             for line, record in read_records(path)]
    if not items:
        raise DataError(path, None, "the file holds no records")
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


def _encode_split(name: str, items: list, cfg, tokenizer) -> tuple[list, list, dict]:
    """Encode and apply the truncation policy: (encoded, kept canonical examples, counts)."""
    max_len, policy = cfg.trainer.max_seq_len, cfg.data.truncation
    encoded, kept = [], []
    truncated, too_long, no_target = 0, 0, 0
    for path, line, example in items:
        ids, labels = _at(path, line, _encode_sequence, example, tokenizer, cfg.data.train_on)
        cut = _over_length(path, line, len(ids), max_len, policy, "example")
        if cut and policy == "drop":
            too_long += 1
            continue
        ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE for label in labels):
            no_target += 1
            continue
        truncated += cut
        encoded.append((ids, labels))
        kept.append(example)

    reasons = {"too_long": too_long, "no_trainable_tokens": no_target}
    _require_some(name, items, encoded, reasons, max_len)
    return encoded, kept, {
        "records": len(items),
        "examples": len(encoded),
        "truncated": truncated,
        "dropped": too_long + no_target,
        "dropped_reasons": reasons,
        "tokens": sum(len(ids) for ids, _ in encoded),
        "trainable_tokens": sum(label != IGNORE for _, labels in encoded for label in labels),
    }


def _over_length(path: str, line: int, length: int, max_len: int, policy: str, what: str) -> bool:
    """Whether `length` tokens exceed trainer.max_seq_len; under data.truncation=error, the error."""
    if length > max_len and policy == "error":
        raise DataError(path, line, f"{what} is {length} tokens, longer than trainer.max_seq_len={max_len} "
                                    f"(data.truncation=error). Raise trainer.max_seq_len, or set "
                                    f"data.truncation=truncate or data.truncation=drop")
    return length > max_len


def _encode_sequence(example: dict, tokenizer, train_on: str) -> tuple[list[int], list[int]]:
    if "text" in example:
        return encode_text(example["text"], tokenizer)
    return encode_chat(example["messages"], tokenizer, train_on)


def _explain(reasons: dict, max_len: int) -> str:
    parts = []
    if reasons["too_long"]:
        parts.append(f"{reasons['too_long']} longer than trainer.max_seq_len={max_len} with data.truncation=drop; "
                     f"raise trainer.max_seq_len or use data.truncation=truncate")
    if reasons["no_trainable_tokens"]:
        parts.append(f"{reasons['no_trainable_tokens']} with no trainable token left (the prompt fills "
                     f"trainer.max_seq_len={max_len}); raise trainer.max_seq_len")
    return "; ".join(parts)


def _pad_id(tokenizer) -> int:
    # Padding is never attended to nor trained on, so any id in the vocabulary serves.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


@contextmanager
def quiet_datasets():
    # Saving a split is quick; its progress bars would only bury the launch log.
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _save_rows(rows: list[dict], where: Path, features: datasets.Features) -> None:
    _remove(where)
    columns = {key: [row[key] for row in rows] for key in features}
    with quiet_datasets():
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(where))


def _write_eval_generate(examples: list[dict], path: Path) -> int:
    """One {"prompt": messages, "reference": text} line per eval chat; an empty file for text data."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            if "messages" in example:
                prompt, reference = prompt_and_reference(example)
                f.write(json.dumps({"prompt": prompt, "reference": reference}, ensure_ascii=False) + "\n")
                count += 1
    return count


def _fingerprint(cfg, tokenizer) -> str:
    data = cfg.data
    h = hashlib.sha256()
    for role, path in (("train", data.path), ("eval", data.eval_path)):
        h.update(role.encode())
        if path:
            _hash_path(h, Path(path))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h.update(vocab.encode())
    settings = {
        "layout": LAYOUT_VERSION,
        "kind": STAGES[cfg.stage.name].data_kind,
        "room_for_generation": cfg.stage.rl.max_new_tokens if STAGES[cfg.stage.name].data_kind == "prompts" else None,
        "chat_template": tokenizer.chat_template if data.format != "text" else None,
        "eos": tokenizer.eos_token_id,
        "format": data.format,
        "system_prompt": data.system_prompt,
        "train_on": data.train_on,
        "packing": data.packing,
        "truncation": data.truncation,
        "max_seq_len": cfg.trainer.max_seq_len,
        # The seed and fraction only shape the data when eval is held out of data.path.
        "hold_out": None if data.eval_path or not data.eval_fraction else [data.eval_fraction, cfg.seed],
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _hash_path(h, path: Path) -> None:
    if not path.exists():
        raise DataError(str(path), None, "file does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else "").encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def _prepared(out: Path, fingerprint: str) -> dict | None:
    stats_file = out / "stats.json"
    if not stats_file.is_file():
        return None
    stats = json.loads(stats_file.read_text())
    if stats.get("fingerprint") != fingerprint:
        return None
    return stats
