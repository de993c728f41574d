"""A conversation and its prefixes rendered with the chat template, exactly as `apply_chat_template(tokenize=False)`
renders each of them, at a fraction of the cost.

Labelling assistant turns renders every conversation several times (template._assistant_spans: the whole, and
each assistant turn's prefixes). `apply_chat_template` converts the messages for the template afresh on every
call (dropping None values, plain-data copies, reasoning-field aliases), which took as long as the Jinja rendering
itself: half of all encoding time. Every one of those conversions works message by message, so the conversion
of a prefix is the prefix of the conversion: here a conversation is converted once and its prefixes are slices.

It relies on transformers' own conversion functions and compiled template, not public API; it checks itself
against `apply_chat_template` on a probe conversation once per template, and falls back to `apply_chat_template`
(same text, slower) when they are missing or disagree.

A render can also wrap every assistant turn's content in two marker characters (`marked=True`): where those land
in the text is where the template put each answer, found from one render (template._framed_spans).
"""

from __future__ import annotations

from typing import Callable

# Private-use characters: no tokenizer gives them meaning, and a conversation holding one is not marked.
MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"
# A conversation of plain turns, with an answer before the last turn and one as the last turn: what renders
# are checked on here, and what template.py learns an answer's framing from.
PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"},
         {"role": "assistant", "content": "Hi again"}]
# The check also covers a None field, which apply_chat_template's conversion drops.
_CHECKED = [*PROBE[:-1], {**PROBE[-1], "tool_calls": None}]
# The keys of a message that the conversion leaves as it is when their values are strings (_plain_copies).
_PLAIN_KEYS = frozenset({"role", "content"})
Render = Callable[..., str]  # (n, add_generation_prompt, marked=False) -> text
# (tokenizer id, template, special tokens) -> the renderer: a few tokenizers per process at most.
_RENDERERS: dict[tuple, Callable[[list[dict]], Render]] = {}


def prefix_renderer(tokenizer) -> Callable[[list[dict]], Render]:
    """`prefix_renderer(tokenizer)(messages)(n, add_generation_prompt)` renders messages[:n] as
    `tokenizer.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=...)` does; with
    `marked=True`, every assistant message's content (a string) is wrapped in MARK_OPEN and MARK_CLOSE first."""
    key = template_key(tokenizer)
    if key not in _RENDERERS:
        _RENDERERS[key] = _fast(tokenizer) or _slow(tokenizer)
    return _RENDERERS[key]


def template_key(tokenizer) -> tuple:
    """What a render depends on besides the messages: tests and data.chat_template change a tokenizer's template."""
    return id(tokenizer), str(tokenizer.chat_template), repr(tokenizer.special_tokens_map)


def _slow(tokenizer):
    def conversation(messages):
        return lambda n, generate, marked=False: tokenizer.apply_chat_template(
            (_marked(messages) if marked else messages)[:n], tokenize=False, add_generation_prompt=generate)
    return conversation


def _marked(messages: list[dict]) -> list[dict]:
    return [{**m, "content": MARK_OPEN + m["content"] + MARK_CLOSE}
            if m.get("role") == "assistant" and isinstance(m.get("content"), str) else m for m in messages]


def _fast(tokenizer):
    try:
        from transformers.utils.chat_template_utils import (_alias_reasoning_fields, _compile_jinja_template,
                                                            _normalize_chat_messages, _plain_template_data)
    except ImportError:
        return None
    template = _compile_jinja_template(tokenizer.get_chat_template(None, None))
    # What apply_chat_template lets the template see besides the messages: the special tokens, no tools, no documents.
    seen = _plain_template_data({**tokenizer.special_tokens_map})

    def conversation(messages):
        converted = (_plain_copies(messages)
                     or _alias_reasoning_fields(_plain_template_data(_normalize_chat_messages(messages))))

        def render(n: int, generate: bool, marked: bool = False) -> str:
            return template.render(messages=(_marked(converted) if marked else converted)[:n], tools=None,
                                   documents=None, add_generation_prompt=generate, **seen)
        return render

    fast, slow = conversation(_CHECKED), _slow(tokenizer)(_CHECKED)
    try:
        same = all(fast(n, g, m) == slow(n, g, m) for n in range(1, len(_CHECKED) + 1) for g in (False, True)
                   for m in (False, True))
    except Exception:  # a template that fails on the probe: the slow path reports it, per conversation, as before
        return None
    return conversation if same else None


def _plain_copies(messages: list[dict]) -> list[dict] | None:
    """The conversion's result, without it, for the messages most data holds: dicts of a role and a string content.
    Each conversion step leaves those as they are (no None to drop, nothing but exact strings, no reasoning field
    to alias), so the result is a copy of each (0.028 -> 0.009 ms a chat of benchmarks/data_prepare.py). None
    otherwise."""
    for message in messages:
        if type(message) is not dict or message.keys() - _PLAIN_KEYS or not all(
                type(value) is str for value in message.values()):
            return None
    return [dict(message) for message in messages]
