"""Reading data files and turning records into one canonical example form.

Every reader yields `(line, record)` so that any later error can name the exact place in the user's
file: the 1-based line for JSON Lines, the 1-based record index for JSON, Parquet and saved datasets.
Canonical examples are `{"messages": [{"role", "content"}, ...]}` (alpaca, chat), `{"text": str}` (text),
`{"prompt": messages, "chosen": messages, "rejected": messages, "margin": float | None}` (preference) and
`{"prompt": messages, "extra": {...}}` (prompt: what the RL stages generate from; `extra` holds the
record's other fields, handed to the reward function).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from ftcluster.errors import DataError

SUPPORTED = (".jsonl (JSON Lines), .json (a list of objects), .parquet, compressed JSON Lines (.jsonl.gz, "
             ".jsonl.zst), or a folder written by datasets.Dataset.save_to_disk")

# Compressed JSON Lines: opened by these, then read line by line like any .jsonl file.
COMPRESSED = (".jsonl.gz", ".jsonl.zst")

EXPECTS = {
    "alpaca": "instruction, input (optional), output, system (optional)",
    "chat": "messages: [{role, content}, ...] or conversations: [{from, value}, ...]",
    "text": "text",
    "preference": "prompt (text or turns), chosen and rejected (text or turns), margin (optional); or chosen "
                  "and rejected as whole conversations sharing their opening turns",
    "prompt": "prompt (text or turns); any other fields go to the reward function",
}

# ShareGPT speakers and OpenAI roles, mapped onto the roles chat templates know.
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool": "tool",
    "observation": "tool",
}


def read_records(path: str, on_error: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield `(line, record)` from a JSONL, JSON, Parquet file or a saved Hugging Face dataset folder.

    A record that is not a JSON object (or not JSON at all) raises, unless `on_error` is given: then it is
    handed the error and reading goes on, so a checker can list every bad line in one pass."""
    p = Path(path)
    if not p.exists():
        raise DataError(path, None, "file does not exist")
    if p.is_dir():
        yield from _read_saved_dataset(path)
    elif p.suffix == ".jsonl" or p.name.endswith(COMPRESSED):
        yield from _read_jsonl(path, on_error)
    elif p.suffix == ".json":
        yield from _read_json(path, on_error)
    elif p.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(path, None, f"unknown file type {p.suffix or '(no extension)'!r}; supported: {SUPPORTED}")


def open_lines(path: str):
    """A binary file object over the (decompressed) bytes of a JSON Lines file."""
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard  # optional: only .zst files need it
        except ImportError:
            raise DataError(path, None, "reading .zst files needs the zstandard package (pip install zstandard)") from None
        import io

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _read_jsonl(path: str, on_error: Callable[[DataError], None] | None) -> Iterator[tuple[int, dict]]:
    with open_lines(path) as f:
        yield from read_lines(f, path, 1, on_error)


def read_lines(lines, path: str, first_line: int,
               on_error: Callable[[DataError], None] | None) -> Iterator[tuple[int, dict]]:
    """`(line, record)` for each non-blank line of `lines` (raw bytes), numbered from `first_line`."""
    for line, raw in enumerate(lines, start=first_line):
        try:
            record = parse_line(raw, path, line)
        except DataError as exc:
            if on_error is None:
                raise
            on_error(exc)
            continue
        if record is not None:
            yield line, record


def parse_line(raw: bytes, path: str, line: int) -> dict | None:
    """One JSON Lines record; None for a blank line."""
    text = _decode(raw, path, line)
    if not text.strip():
        return None
    try:
        # Without the newline, a record cut short is reported at its last column, not the next line.
        record = _loads(text.rstrip("\r\n"), path, line)
    except json.JSONDecodeError as exc:
        raise DataError(path, line, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    return _object(record, path, line)


def _read_json(path: str, on_error: Callable[[DataError], None] | None) -> Iterator[tuple[int, dict]]:
    text = _decode(Path(path).read_bytes(), path, None)
    # Many datasets ship JSON Lines under a .json name; a document that does not open with '['
    # is read line by line so those files work and their errors still carry line numbers.
    if not text.lstrip().startswith("["):
        _refuse_wrapper(text, path)
        yield from _read_jsonl(path, on_error)
        return
    try:
        records = _loads(text, path, None)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    for index, record in enumerate(records, start=1):
        try:
            record = _object(record, path, index)
        except DataError as exc:
            if on_error is None:
                raise
            on_error(exc)
            continue
        yield index, record


# Fields a record itself may hold as a list of objects; any other such field of a whole-file object is a wrapper.
_TURN_FIELDS = ("messages", "conversations", "prompt", "chosen", "rejected")


def _loads(text: str, path: str, line: int | None) -> Any:
    """json.loads refusing a key given twice in one object (json keeps the last one silently)."""
    def unique(pairs: list) -> dict:
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise DataError(path, line, f"key {repeated[0]!r} appears twice in one JSON object; which one is meant is "
                                        f"ambiguous, so remove one")
        return dict(pairs)

    return json.loads(text, object_pairs_hook=unique)


def _refuse_wrapper(text: str, path: str) -> None:
    """A .json file that is one object holding the records under a key ({"data": [...]}): say to give the list."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return  # JSON Lines under a .json name: read line by line
    if not isinstance(document, dict):
        return
    for key, value in document.items():
        if key not in _TURN_FIELDS and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            raise DataError(path, 1, f"the file is one JSON object holding {len(value)} records under {key!r}; give "
                                     f"the list itself: a .json file holding [{{...}}, ...] (the value of {key!r}), "
                                     f"or JSON Lines with one record per line")


def _decode(raw: bytes, path: str, line: int | None) -> str:
    try:
        # utf-8-sig: editors on Windows start files with a byte-order mark that json refuses.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(path, line, f"not UTF-8 text (byte {exc.start}: {exc.reason}); "
                                    f"re-save the file as UTF-8") from None


def _read_parquet(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # not at the top: only Parquet files need it; `ftcluster data` on JSON stays instant

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file; all mean "not Parquet".
        raise DataError(path, None, f"cannot read as Parquet: {_one_line(exc)}") from None
    index = 0
    batches = table.iter_batches()
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # a damaged column chunk shows only when it is read
            raise DataError(path, index + 1 if index else None,
                            f"the Parquet file is damaged (record {index + 1} onwards cannot be read: {_one_line(exc)}); "
                            f"write it again") from None
        if batch is None:
            return
        for record in batch.to_pylist():
            index += 1
            yield index, record


def _one_line(exc: Exception) -> str:
    # pyarrow's messages span lines and may carry control bytes from the damaged file.
    return " ".join("".join(c if c.isprintable() else " " for c in line) for line in str(exc).splitlines()).strip()


def _read_saved_dataset(path: str) -> Iterator[tuple[int, dict]]:
    import datasets  # not at the top: its import takes seconds, and only saved datasets need it

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise DataError(path, None, f"a folder must be written by datasets.Dataset.save_to_disk ({exc}); "
                                    f"supported: {SUPPORTED}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(path, None, f"this is a DatasetDict with splits {list(ds)}; point to one split's folder, "
                                    f"e.g. {Path(path) / next(iter(ds))}")
    for index, record in enumerate(ds, start=1):
        yield index, record


def _object(record: Any, path: str, line: int) -> dict:
    if not isinstance(record, dict):
        raise DataError(path, line, f"a record must be a JSON object, got {_type_name(record)}")
    _encodable(record, path, line, "")
    return record


def _encodable(value: Any, path: str, line: int, where: str) -> None:
    """A JSON escape such as \\ud800 decodes to a lone surrogate, which no tokenizer or UTF-8 file can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(path, line, f"field {where or 'record'!r} holds a lone surrogate "
                                        f"({value[exc.start]!r}, character {exc.start}): an escaped half of a UTF-16 "
                                        f"pair is not text; fix or remove it") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _encodable(item, path, line, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _encodable(item, path, line, f"{where}[{i}]")


def to_example(record: dict, fmt: str, path: str, line: int, system_prompt: str | None = None) -> dict:
    """Convert one record of format `fmt` to the canonical example; errors name the field and the format."""
    fields = _Fields(record, fmt, path, line)
    if fmt == "alpaca":
        return {"messages": _alpaca(fields, system_prompt)}
    if fmt == "chat":
        return {"messages": _chat(fields, system_prompt)}
    if fmt == "text":
        return {"text": fields.string("text", non_empty=True)}
    if fmt == "preference":
        return _preference(fields, system_prompt)
    if fmt == "prompt":
        prompt = _with_system(_turns_or_text(fields, "prompt", "user"), system_prompt)
        _check_order(fields, "prompt", prompt)
        return {"prompt": prompt, "extra": {k: v for k, v in record.items() if k != "prompt"}}
    raise ValueError(f"format {fmt!r} has no converter")  # validate() admits only known formats.


class _Fields:
    """Typed access to a record's fields, with errors that say where and what was expected."""

    def __init__(self, record: dict, fmt: str, path: str, line: int):
        self.record, self.fmt, self.path, self.line = record, fmt, path, line

    def error(self, message: str) -> DataError:
        return DataError(self.path, self.line, message)

    def missing(self, name: str) -> DataError:
        return self.error(f"record has no {name!r} field (format={self.fmt} expects {EXPECTS[self.fmt]})")

    def string(self, name: str, non_empty: bool = False, optional: bool = False) -> str | None:
        # Parquet and saved datasets store an absent optional column value as None.
        value = self.record.get(name)
        if value is None:
            if optional:
                return None
            raise self.missing(name)
        return _check_string(value, name, non_empty, self.error)


def _check_string(value: Any, name: str, non_empty: bool, error) -> str:
    if not isinstance(value, str):
        raise error(f"field {name!r} must be a string, got {_type_name(value)}")
    if non_empty and not value.strip():
        raise error(f"field {name!r} is empty; it must be a non-empty string")
    return value


def _alpaca(fields: _Fields, system_prompt: str | None) -> list[dict]:
    instruction = fields.string("instruction", non_empty=True)
    extra = fields.string("input", optional=True)
    output = fields.string("output", non_empty=True)
    system = fields.string("system", optional=True) or system_prompt
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _chat(fields: _Fields, system_prompt: str | None) -> list[dict]:
    if fields.record.get("messages") is not None:
        name = "messages"
    elif fields.record.get("conversations") is not None:
        name = "conversations"
    else:
        raise fields.missing("messages")
    messages = _turns(fields, name)
    _require_assistant(fields, name, messages, "so there is nothing to train on")
    _check_order(fields, name, messages)
    return _with_system(messages, system_prompt)


def _turns(fields: _Fields, name: str) -> list[dict]:
    """A list of turns in OpenAI ({role, content}) or ShareGPT ({from, value}) form, as OpenAI messages."""
    turns = fields.record[name]
    if not isinstance(turns, list) or not turns:
        raise fields.error(f"field {name!r} must be a non-empty list of turns, got {_type_name(turns)}"
                           + (" (empty)" if isinstance(turns, list) else ""))
    role_key, content_key = ("from", "value") if isinstance(turns[0], dict) and "from" in turns[0] else ("role", "content")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise fields.error(f"field {where!r} must be an object with {role_key!r} and {content_key!r}, "
                               f"got {_type_name(turn)}")
        for key in (role_key, content_key):
            if key not in turn:
                raise fields.error(f"field {where!r} has no {key!r} (format={fields.fmt} expects "
                                   f"{EXPECTS[fields.fmt]})")
        speaker = _check_string(turn[role_key], f"{where}.{role_key}", True, fields.error)
        if speaker not in ROLES:
            raise fields.error(f"field '{where}.{role_key}' is {speaker!r}; known roles: {', '.join(ROLES)}")
        # An empty answer would train the model to stop at once: refused, like an empty alpaca output.
        content = _check_string(turn[content_key], f"{where}.{content_key}", ROLES[speaker] == "assistant",
                                fields.error)
        messages.append({"role": ROLES[speaker], "content": content})
    return messages


def _turns_or_text(fields: _Fields, name: str, role: str) -> list[dict]:
    """A field holding either plain text (one turn of `role`) or a list of turns."""
    value = fields.record.get(name)
    if value is None:
        raise fields.missing(name)
    if isinstance(value, list):
        return _turns(fields, name)
    return [{"role": role, "content": _check_string(value, name, True, fields.error)}]


def _require_assistant(fields: _Fields, name: str, messages: list[dict], why: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise fields.error(f"{'chat in ' if name in ('messages', 'conversations') else 'field '}{name!r} has no "
                           f"assistant turn (role 'assistant' or from 'gpt'), {why}")


# Which role may come right after which (None: the start, after an optional opening system turn).
_FOLLOWS = {"user": (None, "assistant", "tool"), "assistant": ("user", "tool"), "tool": ("assistant", "tool")}


def _check_order(fields: _Fields, name: str, messages: list[dict]) -> None:
    """A system turn opens the conversation or not at all; then user and assistant alternate, starting with the
    user; tool results follow an assistant turn. Chat templates assume it (many raise, some render nonsense)."""
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if i:
                raise fields.error(f"{name!r}: a system turn at position {i}; a system turn may only open the "
                                   f"conversation (move it first or merge it into a user turn)")
            continue
        if previous not in _FOLLOWS[role]:
            after = f"after a {previous} turn" if previous else "as the first turn"
            raise fields.error(f"{name!r}: turn {i} is {role} {after}; turns must go (system,) user, assistant, "
                               f"user, ... with tool turns only after an assistant turn")
        previous = role


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _preference(fields: _Fields, system_prompt: str | None) -> dict:
    """TRL's preference layouts: explicit prompt, or two whole conversations with a shared opening."""
    for side in ("chosen", "rejected"):
        if fields.record.get(side) is None:
            raise fields.missing(side)
    if fields.record.get("prompt") is not None:
        prompt = _turns_or_text(fields, "prompt", "user")
        chosen = _turns_or_text(fields, "chosen", "assistant")
        rejected = _turns_or_text(fields, "rejected", "assistant")
    else:
        whole_chosen, whole_rejected = (_turns(fields, side) for side in ("chosen", "rejected"))
        shared = 0
        while (shared < min(len(whole_chosen), len(whole_rejected))
               and whole_chosen[shared] == whole_rejected[shared]):
            shared += 1
        # The responses start at the first assistant turn after the shared opening.
        while shared > 0 and whole_chosen[shared - 1]["role"] == "assistant":
            shared -= 1
        prompt, chosen, rejected = whole_chosen[:shared], whole_chosen[shared:], whole_rejected[shared:]
        if not prompt:
            raise fields.error("without a 'prompt' field, 'chosen' and 'rejected' must be whole conversations that "
                               "share their opening (prompt) turns; add a 'prompt' field")
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        _require_assistant(fields, side, turns, "so the pair has no response to compare")
        _check_order(fields, side if fields.record.get("prompt") is None else f"prompt + {side}", prompt + turns)
    if chosen == rejected:
        raise fields.error("'chosen' and 'rejected' are the same response; a preference pair needs two different "
                           "responses (remove the record or fix one side)")
    margin = fields.record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise fields.error(f"field 'margin' must be a number, got {_type_name(margin)}")
    if margin is not None and not math.isfinite(margin):
        raise fields.error(f"field 'margin' is {margin}; it must be a finite number")
    return {"prompt": _with_system(prompt, system_prompt), "chosen": chosen, "rejected": rejected,
            "margin": None if margin is None else float(margin)}


def _type_name(value: Any) -> str:
    # JSON's names, since the user wrote JSON (or something that reads like it).
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    return type(value).__name__
