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
"""

from __future__ import annotations

from typing import Callable

_PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
          {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"},
          {"role": "assistant", "content": "Hi again", "tool_calls": None}]
# (tokenizer id, template, special tokens) -> the renderer: a few tokenizers per process at most.
_RENDERERS: dict[tuple, Callable[[list[dict]], Callable[[int, bool], str]]] = {}


def prefix_renderer(tokenizer) -> Callable[[list[dict]], Callable[[int, bool], str]]:
    """`prefix_renderer(tokenizer)(messages)(n, add_generation_prompt)` renders messages[:n] as
    `tokenizer.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=...)` does."""
    key = (id(tokenizer), str(tokenizer.chat_template), repr(tokenizer.special_tokens_map))
    if key not in _RENDERERS:
        _RENDERERS[key] = _fast(tokenizer) or _slow(tokenizer)
    return _RENDERERS[key]


def _slow(tokenizer):
    def conversation(messages):
        return lambda n, generate: tokenizer.apply_chat_template(messages[:n], tokenize=False,
                                                                 add_generation_prompt=generate)
    return conversation


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
        converted = _alias_reasoning_fields(_plain_template_data(_normalize_chat_messages(messages)))
        return lambda n, generate: template.render(messages=converted[:n], tools=None, documents=None,
                                                   add_generation_prompt=generate, **seen)

    fast, slow = conversation(_PROBE), _slow(tokenizer)(_PROBE)
    try:
        same = all(fast(n, g) == slow(n, g) for n in range(1, len(_PROBE) + 1) for g in (False, True))
    except Exception:  # a template that fails on the probe: the slow path reports it, per conversation, as before
        return None
    return conversation if same else None
