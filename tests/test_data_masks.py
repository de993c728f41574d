"""Labels are exactly the tokens the model must produce, for the real tiny tokenizer and its template."""

import json
import re

import pytest
from transformers import AutoTokenizer

from ftcluster.config import ASSETS, apply_schema
from ftcluster.data.prepare import prepare
from ftcluster.data.template import (IGNORE, apply_template_override, encode_chat, encode_text,
                                     prompt_and_reference)
from ftcluster.errors import ConfigError, DataError

TINY = ASSETS / "models" / "tiny"
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris, of course."},
]


@pytest.fixture
def tokenizer():
    # Function-scoped: several tests replace the template.
    return AutoTokenizer.from_pretrained(TINY)


def trained_runs(ids, labels):
    """The contiguous runs of trained tokens, each as (ids, labels)."""
    runs, current = [], None
    for token, label in zip(ids, labels):
        if label == IGNORE:
            current = None
            continue
        if current is None:
            current = ([], [])
            runs.append(current)
        current[0].append(token)
        current[1].append(label)
    return runs


def test_labels_are_the_assistant_turns_and_their_end_token(tokenizer):
    ids, labels = encode_chat(CHAT, tokenizer)
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    runs = trained_runs(ids, labels)
    assert all(run_ids == run_labels for run_ids, run_labels in runs)
    assert [tokenizer.decode(run_ids) for run_ids, _ in runs] == ["4<|im_end|>", "Paris, of course.<|im_end|>"]
    assert labels[0] == IGNORE


def test_templates_default_system_prompt_is_rendered_but_not_trained(tokenizer):
    ids, labels = encode_chat(CHAT[1:3], tokenizer)
    assert "You are a helpful AI assistant" in tokenizer.decode(ids)
    assert [tokenizer.decode(run) for run, _ in trained_runs(ids, labels)] == ["4<|im_end|>"]


def test_train_on_all(tokenizer):
    ids, labels = encode_chat(CHAT, tokenizer, train_on="all")
    assert labels == [IGNORE] + ids[1:]


def test_text_ends_with_eos_and_trains_every_token(tokenizer):
    ids, labels = encode_text("Plain text for pre-training.", tokenizer)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == "Plain text for pre-training."
    assert labels == [IGNORE] + ids[1:]


def test_prompt_and_reference():
    assert prompt_and_reference({"messages": CHAT}) == (CHAT[:4], "Paris, of course.")


def test_inline_and_file_template_override(tokenizer, tmp_path):
    inline = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}[/{{ m.role }}]{% endfor %}"
              "{% if add_generation_prompt %}[assistant]{% endif %}")
    apply_template_override(tokenizer, inline)
    ids, labels = encode_chat(CHAT[1:3], tokenizer)
    assert [tokenizer.decode(run) for run, _ in trained_runs(ids, labels)] == ["4[/assistant]"]

    (tmp_path / "t.jinja").write_text(inline.replace("[/", "[end "))
    apply_template_override(tokenizer, str(tmp_path / "t.jinja"))
    ids, labels = encode_chat(CHAT[1:3], tokenizer)
    assert [tokenizer.decode(run) for run, _ in trained_runs(ids, labels)] == ["4[end assistant]"]


def test_no_template_and_no_override(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template.*Set data.chat_template"):
        apply_template_override(tokenizer, None)


def test_override_that_is_neither_jinja_nor_a_file(tokenizer):
    with pytest.raises(ConfigError, match="'chatml.jinja' is neither inline Jinja"):
        apply_template_override(tokenizer, "chatml.jinja")


def test_broken_template_fails_at_override(tokenizer):
    with pytest.raises(ConfigError, match="data.chat_template.*the chat template failed"):
        apply_template_override(tokenizer, "{% for m in messages %}{{ m.content }")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Earlier assistant turns render differently from the last one, as reasoning-dropping templates do.
    apply_template_override(tokenizer, "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
                                       "[assistant](old)[/assistant]{% else %}[{{ m.role }}]{{ m.content }}"
                                       "[/{{ m.role }}]{% endif %}{% endfor %}"
                                       "{% if add_generation_prompt %}[assistant]{% endif %}")
    with pytest.raises(ConfigError, match="does not render conversation prefixes consistently at turn 2"):
        encode_chat(CHAT, tokenizer)


def test_template_refusing_a_conversation_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (CHAT[1:3], CHAT[:3])) + "\n")
    template = ("{% if messages[0].role == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg = apply_schema({"data": {"path": str(path), "format": "chat", "chat_template": template}})
    with pytest.raises(DataError, match=re.escape(f"{path}:2: config key 'data.chat_template': the chat template "
                                                  f"failed on this conversation: no system turns")):
        prepare(cfg, tokenizer, str(tmp_path / "out"))


def test_batch_encoding_labels_the_tokens_one_at_a_time_encoding_does(tokenizer, monkeypatch):
    """encode_records finds each span's tokens from its edge characters (encode._token_ranges); encode_chat marks
    every token whose offsets overlap a span. Multi-byte characters (several byte tokens for one character),
    newlines and runs of spaces at the edges of turns must not change which tokens are trained."""
    import random

    import numpy as np

    from ftcluster.data import encode
    from ftcluster.data.encode import Settings, encode_records

    r = random.Random(0)
    alphabet = "aé 字😀\n\t  xyz,."
    chats = [CHAT]
    for _ in range(60):
        chat = []
        for _ in range(r.randint(1, 3)):
            for role in ("user", "assistant"):
                text = "".join(r.choice(alphabet) for _ in range(r.randint(0, 30)))
                visible = r.choice("é字😀x")  # blank content is refused; spaces may still open or close a turn
                chat.append({"role": role, "content": visible + text if r.random() < 0.5 else text + visible})
        chats.append(chat)
    settings = Settings("assistant", None, 4096, "error")
    records = [(i, i + 1, {"messages": chat}) for i, chat in enumerate(chats)]
    expected = [encode_chat(chat, tokenizer) for chat in chats]

    def check(encoded):
        assert encoded.errors == [] and encoded.kept == list(range(len(chats)))
        for (ids, labels), got_ids, got_labels in zip(expected, encoded.ids, encoded.labels):
            assert got_ids.tolist() == ids
            assert got_labels.tolist() == labels
        assert any((np.asarray(l) != IGNORE).sum() > 3 for l in encoded.labels)

    check(encode_records(records, "chats.jsonl", "chat", settings, tokenizer, False))
    # A span edge on a character no token holds (tokenizers that trim spaces from offsets): every token's
    # offsets decide, with the same result.
    monkeypatch.setattr(encode, "_token_ranges", lambda *a: None)
    check(encode_records(records, "chats.jsonl", "chat", settings, tokenizer, False))


def test_span_tokens_from_edge_characters_match_the_offsets_at_any_edge(tokenizer):
    """The same check at span edges anywhere in a text, inside multi-byte characters' byte tokens included."""
    import random

    import numpy as np

    from ftcluster.data.encode import _tokenize_chats
    from ftcluster.data.template import span_labels

    r = random.Random(1)
    texts, spans = [], []
    for _ in range(300):
        text = "".join(r.choice("aé 字😀\n\t  xyz,.ñ🙂") for _ in range(r.randint(2, 40)))
        cuts = sorted(r.sample(range(len(text) + 1), 2))
        texts.append(text)
        spans.append([tuple(cuts)])
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    expected = [span_labels(ids, offsets, s) for ids, offsets, s in zip(encoded["input_ids"], encoded["offset_mapping"], spans)]
    got = _tokenize_chats(tokenizer, texts, spans)
    for (ids, labels), want in zip(got, expected):
        assert labels.tolist() == want.tolist()
    # Spans that share a token with their neighbours happen here (the widening of encode._token_ranges).
    assert sum(int((l != IGNORE).sum()) for _, l in got) > 0


SPAN_TEMPLATES = {
    # name: (template, None for the tokenizer's own; of the 200 conversations, how many at least the one marked
    # render answers: those with two answers or more, about 160, where it holds; 0 where it must not)
    "ChatML with a default system prompt": (None, 150),
    "brackets": ("{% for m in messages %}[{{ m.role }}]{{ m.content }}[/{{ m.role }}]{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}", 150),
    "no end-of-turn marker": ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant: {% endif %}", 150),
    # Trimming changes an answer with whitespace at an edge, markers or not: those fall back.
    "trimmed content": ("{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</s>\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}", 30),
    # Consistent prefixes, but what precedes the content inside the span differs from answer to answer.
    "numbered answers": ("{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}({{ loop.index }}) "
                         "{% endif %}{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>"
                         "{% endif %}", 0),
}


@pytest.mark.parametrize("name", SPAN_TEMPLATES)
def test_spans_from_one_marked_render_are_the_prefix_renders_spans(tokenizer, name):
    """template._framed_spans must give exactly the spans of the prefix renders (the definition), for any
    conversation it answers; the rest fall back. Whitespace at the answers' edges, multi-byte characters, answers
    that repeat the framing's text, and preference pairs' from_turn."""
    import random

    from ftcluster.data import template as t

    source, at_least = SPAN_TEMPLATES[name]
    if source is not None:
        apply_template_override(tokenizer, source)
    r = random.Random(2)
    pieces = ["a", "é", "字", "😀", " ", "  ", "\n", "\t", "</s>", "[/assistant]", "assistant: ", "(3) ", "x y"]
    answered = 0
    for case in range(200):
        chat = [{"role": "system", "content": "Be brief."}] if r.random() < 0.5 else []
        for _ in range(r.randint(1, 5)):
            for role in ("user", "assistant"):
                text = "".join(r.choice(pieces) for _ in range(r.randint(0, 8)))
                chat.append({"role": role, "content": "x" + text if r.random() < 0.5 else text + "y"})
        from_turn = r.choice([0, 0, 2, 3])
        render = t._prefixes(tokenizer, chat)
        full = render(len(chat), False)
        expected = t._prefix_spans(chat, render, full, from_turn)
        got = t._framed_spans(chat, tokenizer, render, full, from_turn)
        if got is not None:
            answered += 1
            assert got == expected, (case, chat, full)
        assert t._assistant_spans(chat, tokenizer, from_turn) == (full, expected)
    assert answered >= at_least if at_least else answered == 0


def test_marked_contents_only_for_well_formed_pairs_that_add_nothing_else():
    from ftcluster.data.render import MARK_CLOSE as C, MARK_OPEN as O
    from ftcluster.data.template import _marked_contents

    full = "<a>Hi</a><a>yo</a>"
    assert _marked_contents(f"<a>{O}Hi{C}</a><a>{O}yo{C}</a>", full) == [(3, 5), (12, 14)]
    assert _marked_contents(f"<a>{O}{C}Hi</a><a>yo</a>", full) == [(3, 3)]  # an empty content
    for bad in (f"<a>{O}Hi</a><a>yo{C}{C}</a>",  # a close without its open
                f"<a>{C}Hi{O}</a><a>yo</a>",  # close before open
                f"<a>{O}H{O}i{C}</a><a>yo{C}</a>",  # nested
                f"<a>{O}Hi</a><a>yo</a>",  # never closed
                f"<a>{O}Hi{C}</a><a>{O}yo!{C}</a>",  # the template changed the text beside the markers
                f"<a>{O}Hi{C}</a>"):  # shorter
        assert _marked_contents(bad, full) is None, bad


def test_prefix_renders_are_apply_chat_templates_for_plain_and_converted_messages(tokenizer):
    """render.py converts a conversation once (plain role/content dicts: copied, skipping transformers' conversion)
    and renders its prefixes: each must be what apply_chat_template renders, also for messages the conversion
    changes (a None field dropped, a reasoning field aliased, a name kept)."""
    from ftcluster.data.render import _fast, prefix_renderer

    apply_template_override(tokenizer, "{% for m in messages %}<{{ m.role }}{% if m.name %} {{ m.name }}{% endif %}>"
                                       "{% if m.reasoning_content %}[{{ m.reasoning_content }}]{% endif %}"
                                       "{{ m.content }}{% if m.tool_calls is defined %}(calls){% endif %}</s>"
                                       "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert _fast(tokenizer) is not None  # what is checked here: the renderer that skips apply_chat_template
    conversations = [CHAT,
                     [*CHAT[:2], {**CHAT[2], "tool_calls": None}, CHAT[3], {**CHAT[4], "thinking": "recall"}],
                     [{**CHAT[1], "name": "ann"}, {**CHAT[2], "reasoning": "sum"}]]
    for messages in conversations:
        render = prefix_renderer(tokenizer)(messages)
        for n in range(1, len(messages) + 1):
            for generate in (False, True):
                want = tokenizer.apply_chat_template(messages[:n], tokenize=False, add_generation_prompt=generate)
                assert render(n, generate) == want, (messages[:n], generate)
    # The conversions did matter here: an aliased reasoning field is rendered, a None one is not.
    assert "[recall]" in prefix_renderer(tokenizer)(conversations[1])(5, False)
    assert "(calls)" not in prefix_renderer(tokenizer)(conversations[1])(5, False)
