"""Encoding a batch of records into training sequences: the same tokens and labels as template.encode_chat
and template.encode_text give one at a time, with one tokenizer call per batch.

The per-record work that is not tokenizing (rendering the template's prefixes, the label mask) stays
per record; tokenizing the rendered texts together saves most of the Python overhead around the Rust
tokenizer. A record that fails anywhere becomes a DataError at its file and line, collected, never raised,
so a worker reports every bad record of its unit and the driver can list them in file order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ftcluster.data.formats import to_example
from ftcluster.data.template import (IGNORE, _check_plain, chat_text, check_fast, prompt_and_reference,
                                     span_labels)
from ftcluster.errors import ConfigError, DataError, UserError

# Why an example was left out; the codes are what the shards' summaries carry.
TOO_LONG, NO_TARGET = 1, 2


@dataclass(frozen=True)
class Settings:
    """What shapes an encoded sequence, beside the tokenizer."""

    train_on: str
    system_prompt: str | None
    max_seq_len: int
    truncation: str


@dataclass
class Encoded:
    """One batch's outcome, record by record in order (records: their 0-based position in the unit)."""

    kept: list[int] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    generate: list[str | None] = field(default_factory=list)
    dropped: list[tuple[int, int]] = field(default_factory=list)  # (record, TOO_LONG or NO_TARGET)
    errors: list[DataError] = field(default_factory=list)


def encode_records(records: list[tuple[int, int, dict]], path: str, fmt: str, settings: Settings, tokenizer,
                   keep_generate: bool) -> Encoded:
    """Encode `(position, line, record)` triples of one file; apply data.truncation."""
    out = Encoded()
    texts, pending = [], []  # what to tokenize, and for each: (position, line, example, spans or None, is_text)
    for position, line, record in records:
        try:
            example = to_example(record, fmt, path, line, settings.system_prompt)
            if "text" in example:
                _text_ready(example["text"], tokenizer)
                texts.append(example["text"])
                pending.append((position, line, example, None, True))
            else:
                full, spans = chat_text(example["messages"], tokenizer, settings.train_on)
                check_fast(tokenizer)
                texts.append(full)
                pending.append((position, line, example, spans, False))
        except UserError as exc:
            out.errors.append(exc if isinstance(exc, DataError) else DataError(path, line, str(exc)))
    if not pending:
        return out
    chats = [i for i, p in enumerate(pending) if not p[4]]
    docs = [i for i, p in enumerate(pending) if p[4]]
    encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, (ids, labels) in zip(chats, _tokenize_chats(tokenizer, [texts[i] for i in chats],
                                                       [pending[i][3] for i in chats])):
        encoded[i] = ids, labels
    if docs:
        # As encode_text: the tokenizer's own special tokens, then eos, every token trained.
        for i, ids in zip(docs, tokenizer([texts[i] for i in docs], add_special_tokens=True)["input_ids"]):
            ids = np.asarray(ids + [tokenizer.eos_token_id], dtype=np.int32)
            encoded[i] = ids, ids.copy()
    for i, (position, line, example, _, _) in enumerate(pending):
        ids, labels = encoded[i]
        if len(labels):
            labels[0] = IGNORE  # nothing predicts the first token (template._no_first_label)
        _apply_policy(out, position, line, path, example, ids, labels, settings, keep_generate)
    return out


def _apply_policy(out: Encoded, position: int, line: int, path: str, example: dict, ids: np.ndarray,
                  labels: np.ndarray, settings: Settings, keep_generate: bool) -> None:
    max_len = settings.max_seq_len
    cut = len(ids) > max_len
    if cut and settings.truncation == "error":
        out.errors.append(DataError(path, line, f"example is {len(ids)} tokens, longer than trainer.max_seq_len="
                                                f"{max_len} (data.truncation=error). Raise trainer.max_seq_len, or "
                                                f"set data.truncation=truncate or data.truncation=drop"))
        return
    if cut and settings.truncation == "drop":
        out.dropped.append((position, TOO_LONG))
        return
    ids, labels = ids[:max_len], labels[:max_len]
    if not (labels != IGNORE).any():
        out.dropped.append((position, NO_TARGET))
        return
    out.kept.append(position)
    out.ids.append(ids)
    out.labels.append(labels)
    out.truncated.append(bool(cut))
    generate = None
    if keep_generate and "messages" in example:
        prompt, reference = prompt_and_reference(example)
        generate = json.dumps({"prompt": prompt, "reference": reference}, ensure_ascii=False)
    out.generate.append(generate)


def _text_ready(text: str, tokenizer) -> None:
    """encode_text's checks, in its order."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("data.format", "format=text appends the end-of-sequence token so the model learns where "
                                         "a document ends, but this tokenizer has no eos_token")
    _check_plain([{"role": "text", "content": text}], tokenizer)


def _tokenize_chats(tokenizer, texts: list[str], spans: list) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) of each rendered chat, in one tokenizer call: every token trained where its spans are None,
    else the tokens template.span_labels marks."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        encoded = [(np.asarray(ids, dtype=np.int32), offsets, None)
                   for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"])]
    else:  # the Rust tokenizer directly: the same encodings the wrapper makes, without its Python lists
        encoded = [(np.asarray(e.ids, dtype=np.int32), None, e)
                   for e in backend.encode_batch(texts, add_special_tokens=False)]
    out = []
    for (ids, offsets, encoding), s in zip(encoded, spans):
        ranges = None if s is None or encoding is None else _token_ranges(encoding, len(ids), s)
        if s is None:  # train_on=all
            out.append((ids, ids.copy()))
        elif ranges is None:  # no Rust encoding, or a span edge on a character no token holds: the offsets decide
            out.append((ids, span_labels(ids, offsets if encoding is None else encoding.offsets, s)))
        else:
            trained = np.zeros(len(ids), dtype=bool)
            for first, last in ranges:
                trained[first:last + 1] = True
            out.append((ids, np.where(trained, ids, np.int32(IGNORE))))
    return out


def _token_ranges(encoding, count: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """The first and last token of each span, found from its two edge characters rather than from every token's
    offsets (converting those to numpy was a tenth of all encoding time). The same tokens as span_labels: the
    tokens overlapping a span are the run from the one holding its first character to the one holding its last,
    widened over the tokens after it that share its last character (the byte pieces of one character). None where an
    edge character belongs to no token (offsets trimmed of spaces): the caller then uses the offsets."""
    ranges = []
    for start, end in spans:
        if end <= start:
            continue
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:
            return None
        # char_to_token gives the first token holding a character: only the last edge can need widening.
        while last + 1 < count and (chars := encoding.token_to_chars(last + 1)) is not None and chars[0] < end:
            last += 1
        ranges.append((first, last))
    return ranges
