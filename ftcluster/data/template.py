"""Rendering examples with the chat template and deciding which tokens carry a loss.

Assistant spans are found on the rendered text, not by searching for token patterns: for each assistant
turn the conversation is rendered up to that turn with the generation prompt, and again including the
turn; the difference is exactly what the model must produce. That works for any template that renders
prefixes consistently (checked, with an error naming the turn when it does not), and the text is
tokenized once, so training sees the same tokens as `apply_chat_template(tokenize=True)`.

Those prefix renders are most of the rendering time of a long conversation (quadratic in its turns), so they are
made once per template, on a probe, to learn what the template writes around an answer inside its span (ChatML:
nothing before it, `<|im_end|>` after). A conversation is then rendered twice, as is and with every answer
wrapped in marker characters (render.py); where the markers land, framed as learned, are the same spans. A
conversation on which that does not hold exactly (the markers change the text, the framing is not there) takes
the prefix renders, and so does every conversation of a template whose framing differs between turns.

Because the rendered text is tokenized as a whole, a control token's string typed inside a message (`<|im_end|>`)
would become that control token and end the turn early; such content is refused (_check_plain), naming the
turn and the token, rather than silently trained on as markup.
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import jinja2
import numpy as np

from ftcluster.data.render import MARK_CLOSE, MARK_OPEN, PROBE, prefix_renderer, template_key
from ftcluster.errors import ConfigError, UserError

IGNORE = -100  # The label value Hugging Face losses skip.

_OVERRIDE_PROBE = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]


def apply_template_override(tokenizer, chat_template: str | None) -> None:
    """Set `data.chat_template` (inline Jinja or a file path) on the tokenizer; fail early if none works."""
    if chat_template is not None:
        tokenizer.chat_template = template_text(chat_template)
    if not tokenizer.chat_template:
        raise ConfigError("data.chat_template",
                          "the tokenizer has no chat template, so chat and alpaca data cannot be rendered. Set "
                          "data.chat_template to inline Jinja or a .jinja file (for example ChatML), or use "
                          "data.format=text")
    # Render once now so a broken template fails here, before any data is read or worker started.
    _render(tokenizer, _OVERRIDE_PROBE, add_generation_prompt=False)


def template_text(value: str) -> str:
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError("data.chat_template",
                          f"{value!r} is neither inline Jinja (it has no '{{{{' or '{{%') nor an existing file")
    return path.read_text(encoding="utf-8")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise ConfigError("data.chat_template", f"the chat template failed on this conversation: {exc}") from None


def _prefixes(tokenizer, messages: list[dict]):
    """`render(n, add_generation_prompt, marked=False)`: messages[:n] as _render renders it, the messages
    converted for the template once for all prefixes (ftcluster.data.render)."""
    conversation = prefix_renderer(tokenizer)(messages)

    def render(n: int, add_generation_prompt: bool, marked: bool = False) -> str:
        if n == 0:  # apply_chat_template refuses an empty conversation: the same error as ever
            return _render(tokenizer, [], add_generation_prompt)
        try:
            return conversation(n, add_generation_prompt, marked)
        except jinja2.TemplateError as exc:
            raise ConfigError("data.chat_template", f"the chat template failed on this conversation: {exc}") from None
    return render


def _assistant_spans(messages: list[dict], tokenizer, from_turn: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The full render and the character span of each assistant turn from `from_turn` on (content + end
    of turn)."""
    render = _prefixes(tokenizer, messages)
    full = render(len(messages), False)
    spans = _framed_spans(messages, tokenizer, render, full, from_turn)
    return full, spans if spans is not None else _prefix_spans(messages, render, full, from_turn)


def _prefix_spans(messages: list[dict], render, full: str, from_turn: int) -> list[tuple[int, int]]:
    """The spans from renders of the prefixes before and through each assistant turn: for any template that
    renders prefixes consistently (refused with a ConfigError where it does not)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < from_turn:
            continue
        before = render(i, True)
        # The last turn's prefix is the whole conversation, rendered already (rendering is most of encoding's time).
        through = full if i == len(messages) - 1 else render(i + 1, False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError("data.chat_template",
                              f"the chat template does not render conversation prefixes consistently at turn {i} "
                              f"(assistant): rendering the turns before it with add_generation_prompt=True, or up "
                              f"to it, does not give a prefix of the whole conversation, so the assistant tokens "
                              f"cannot be located. Templates that rewrite earlier turns (e.g. drop reasoning) do "
                              f"this; set data.chat_template to one that does not, or use data.train_on=all")
        # Whitespace after the end-of-turn marker (ChatML's newline) belongs to the next turn's framing:
        # the model should learn to stop at the marker, not to emit what follows it.
        turn = through[len(before):].rstrip()
        spans.append((len(before), len(before) + len(turn)))
    return spans


# template_key -> (text between a span's start and its content, text between the content and its end) or None
_FRAMINGS: dict[tuple, tuple[str, str] | None] = {}


def _framed_spans(messages: list[dict], tokenizer, render, full: str, from_turn: int) -> list[tuple[int, int]] | None:
    """The spans _prefix_spans gives, from one marked render and the template's framing; None where that cannot be
    shown for this conversation (the caller then renders the prefixes)."""
    key = template_key(tokenizer)
    if key not in _FRAMINGS:
        _FRAMINGS[key] = _learn_framing(tokenizer)
    framing = _FRAMINGS[key]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    # One answer takes two renders either way, one of them shorter without markers. An assistant turn first has
    # no prefix to render: _prefix_spans reports that as apply_chat_template does.
    if framing is None or len(answers) < 2 or answers[0] == 0 or MARK_OPEN in full or MARK_CLOSE in full:
        return None
    contents = _marked_contents(render(len(messages), False, True), full)
    if contents is None or len(contents) != len(answers):
        return None
    head, foot = framing
    spans = []
    for i, (content_start, content_end) in zip(answers, contents):
        start = content_start - len(head)
        if start < 0 or not (full.startswith(head, start) and full.startswith(foot, content_end)):
            return None
        if i >= from_turn:
            # As _prefix_spans strips the turn: the whitespace after its last character belongs to what follows.
            spans.append((start, start + len((full[start:content_end] + foot).rstrip())))
    return spans


def _learn_framing(tokenizer) -> tuple[str, str] | None:
    """What the template writes inside an answer's span around its content, the same for every answer of the
    probe; None when it is not (or the probe cannot be rendered), so every conversation renders its prefixes."""
    render = _prefixes(tokenizer, PROBE)
    try:
        full = render(len(PROBE), False)
        spans = _prefix_spans(PROBE, render, full, 0)
        contents = _marked_contents(render(len(PROBE), False, True), full)
    except (UserError, jinja2.TemplateError):
        return None
    if contents is None or len(contents) != 2 or len(spans) != 2:
        return None
    pairs = list(zip(spans, contents))
    if not all(start <= content_start <= content_end <= end for (start, end), (content_start, content_end) in pairs):
        return None
    framings = {(full[start:content_start], full[content_end:end])
                for (start, end), (content_start, content_end) in pairs}
    return framings.pop() if len(framings) == 1 else None


def _marked_contents(marked: str, full: str) -> list[tuple[int, int]] | None:
    """Where each marked content lies in `full`, in order; None unless `marked` is exactly `full` with pairs of
    markers added. (String methods, not a regex over the markers: this runs for every conversation.)"""
    before, *pieces = marked.split(MARK_OPEN)
    if MARK_CLOSE in before:
        return None
    contents, at = [], len(before)
    for piece in pieces:
        content, closed, after = piece.partition(MARK_CLOSE)
        if not closed or MARK_CLOSE in after:
            return None
        contents.append((at, at + len(content)))
        at += len(content) + len(after)
    if marked.replace(MARK_OPEN, "").replace(MARK_CLOSE, "") != full:
        return None
    return contents


def encode_chat(messages: list[dict], tokenizer, train_on: str = "assistant",
                from_turn: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and labels: assistant tokens (or every token) and IGNORE elsewhere.
    With `from_turn`, only assistant turns from that index on are labelled (a preference pair's response
    after its prompt)."""
    full, spans = chat_text(messages, tokenizer, train_on, from_turn)
    encoded = _tokenize(tokenizer, full)
    ids = encoded["input_ids"]
    labels = list(ids) if spans is None else span_labels(ids, encoded["offset_mapping"], spans).tolist()
    return ids, _no_first_label(labels)


def chat_text(messages: list[dict], tokenizer, train_on: str = "assistant",
              from_turn: int = 0) -> tuple[str, list[tuple[int, int]] | None]:
    """The rendered chat and the character spans that carry a loss (None: every token, train_on=all)."""
    _check_plain(messages, tokenizer)
    if train_on == "all":
        return _render(tokenizer, messages, add_generation_prompt=False), None
    return _assistant_spans(messages, tokenizer, from_turn)


def span_labels(ids, offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels (int32) from token character offsets: a token is trained when any of its characters lies in a
    span, so no answer character is lost when a token straddles a span edge. The first label is not yet
    IGNORE'd."""
    ids = np.asarray(ids, dtype=np.int32)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    trained = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        trained |= (starts < end) & (start < ends)
    return np.where(trained, ids, np.int32(IGNORE)).astype(np.int32)


def encode_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Plain text for continued pre-training: every token is trained, and the document ends with eos."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("data.format", "format=text appends the end-of-sequence token so the model learns where "
                                         "a document ends, but this tokenizer has no eos_token")
    _check_plain([{"role": "text", "content": text}], tokenizer)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return ids, _no_first_label(list(ids))


def prompt_and_reference(example: dict) -> tuple[list[dict], str]:
    """For generation-based eval: the turns before the last assistant turn, and that turn's content."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def encode_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of a prompt rendered with the generation prompt: what generation continues from."""
    _check_plain(messages, tokenizer)
    return _tokenize(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))["input_ids"]


_SPECIAL_PATTERNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_pattern(tokenizer) -> re.Pattern | None:
    """One regex over every special token string of the tokenizer (Llama 3 has hundreds), built once."""
    if tokenizer not in _SPECIAL_PATTERNS:
        specials = set(tokenizer.all_special_tokens)
        specials.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
        specials.discard("")
        _SPECIAL_PATTERNS[tokenizer] = (re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
                                        if specials else None)
    return _SPECIAL_PATTERNS[tokenizer]


def _check_plain(messages: list[dict], tokenizer) -> None:
    pattern = _special_pattern(tokenizer)
    if pattern is None:
        return
    for i, message in enumerate(messages):
        found = pattern.search(message["content"])
        if found:
            where = "the text" if message["role"] == "text" else f"turn {i} ({message['role']})"
            raise UserError(f"{where} contains {found.group(0)!r}, a control token of this tokenizer; it would be "
                            f"read as that token (ending the turn or opening a role), not as text. Remove or "
                            f"rewrite it in the data")


def check_fast(tokenizer) -> None:
    if not tokenizer.is_fast:
        raise ConfigError("model.path", "label masks need character offsets, which only fast (Rust `tokenizers`) "
                                        "tokenizers give; this model's tokenizer is a slow one")


def _tokenize(tokenizer, text: str):
    check_fast(tokenizer)
    # The template writes every special token itself (bos included), as apply_chat_template does.
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)


def _no_first_label(labels: list[int]) -> list[int]:
    # Nothing predicts the first token; a label there would only ever be skipped by the shift or, once
    # packed, teach the previous example's last token to predict this one.
    if labels:
        labels[0] = IGNORE
    return labels
