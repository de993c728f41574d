"""Reading every supported file kind and spelling, and the message each bad input gets."""

import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from ftcluster.config import ASSETS, apply_schema
from ftcluster.data.formats import read_records, to_example
from ftcluster.data.prepare import prepare
from ftcluster.errors import DataError

TINY = ASSETS / "models" / "tiny"
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


def write_jsonl(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def config(path: str, **data):
    trainer = {"max_seq_len": data.pop("max_seq_len", 256), "global_batch": data.pop("global_batch", 1),
               "micro_batch_per_device": 1}
    return apply_schema({"data": {"path": path, "format": "alpaca", **data}, "trainer": trainer})


def raises(match: str):
    return pytest.raises(DataError, match=re.escape(match))


# Reading


def test_jsonl_numbers_lines_and_skips_blank_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, "", "   ", {**ALPACA, "output": "6"}])
    assert [(line, r["output"]) for line, r in read_records(path)] == [(1, "5"), (4, "6")]


def test_json_list_numbers_records(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ALPACA, {**ALPACA, "output": "6"}], indent=2))
    assert [(i, r["output"]) for i, r in read_records(str(path))] == [(1, "5"), (2, "6")]


def test_json_lines_under_a_json_name_are_read_as_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [ALPACA, "", ALPACA])
    assert [line for line, _ in read_records(path)] == [1, 3]


def test_parquet(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([ALPACA, {**ALPACA, "output": "6"}]), path)
    assert [(i, r["output"]) for i, r in read_records(path)] == [(1, "5"), (2, "6")]


def test_saved_dataset_folder(tmp_path):
    datasets.Dataset.from_list([ALPACA, {**ALPACA, "output": "6"}]).save_to_disk(str(tmp_path / "ds"))
    assert [(i, r["output"]) for i, r in read_records(str(tmp_path / "ds"))] == [(1, "5"), (2, "6")]


def test_dataset_dict_folder_asks_for_a_split(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list([ALPACA])}).save_to_disk(str(tmp_path / "dd"))
    with raises("point to one split's folder"):
        list(read_records(str(tmp_path / "dd")))


def test_missing_file(tmp_path):
    with raises(f"{tmp_path}/nope.jsonl: file does not exist"):
        list(read_records(str(tmp_path / "nope.jsonl")))


def test_unknown_extension_lists_supported_kinds(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with raises("unknown file type '.csv'; supported: .jsonl (JSON Lines), .json (a list of objects), .parquet"):
        list(read_records(str(tmp_path / "d.csv")))


def test_malformed_json_line_says_what_json_said(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, '{"instruction": "x",'])
    with raises(f"{path}:2: invalid JSON: Expecting property name enclosed in double quotes (column 21)"):
        list(read_records(path))


def test_malformed_json_document_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"a": 1},\n {"a": 2,}\n]')
    with raises(f"{path}:3: invalid JSON"):
        list(read_records(str(path)))


def test_bytes_that_are_not_utf8_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n{"text": "\xff"}\n')
    assert next(read_records(str(path))) == (1, {"text": "ok"})
    with raises(f"{path}:2: not UTF-8 text"):
        list(read_records(str(path)))


def test_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, [1, 2]])
    with raises(f"{path}:2: a record must be a JSON object, got list"):
        list(read_records(path))


# Converting: alpaca


def test_alpaca_joins_instruction_and_input():
    assert to_example(ALPACA, "alpaca", "d.jsonl", 1) == {"messages": [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]}


def test_alpaca_without_input_and_with_system():
    record = {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief."}
    assert to_example(record, "alpaca", "d.jsonl", 1, system_prompt="ignored")["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"}]
    assert to_example({"instruction": "Say hi.", "output": "hi"}, "alpaca", "d.jsonl", 1,
                      system_prompt="Be kind.")["messages"][0] == {"role": "system", "content": "Be kind."}


def test_alpaca_missing_field():
    with raises("data.jsonl:7: record has no 'output' field (format=alpaca expects instruction, input (optional), "
                "output"):
        to_example({"instruction": "x"}, "alpaca", "data.jsonl", 7)


@pytest.mark.parametrize("field,value,got", [("output", 5, "int"), ("instruction", ["a"], "list"),
                                             ("input", {"a": 1}, "object")])
def test_alpaca_wrong_type(field, value, got):
    with raises(f"data.jsonl:3: field '{field}' must be a string, got {got}"):
        to_example({**ALPACA, field: value}, "alpaca", "data.jsonl", 3)


def test_alpaca_empty_instruction():
    with raises("data.jsonl:2: field 'instruction' is empty"):
        to_example({**ALPACA, "instruction": " "}, "alpaca", "data.jsonl", 2)


# Converting: chat


def test_chat_openai_spelling_multi_turn():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert to_example({"messages": turns}, "chat", "d.jsonl", 1) == {"messages": turns}


def test_chat_sharegpt_spelling():
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                                {"from": "gpt", "value": "b"}, {"from": "observation", "value": "o"},
                                {"from": "gpt", "value": "c"}]}
    assert [(m["role"], m["content"]) for m in to_example(record, "chat", "d.jsonl", 1)["messages"]] == [
        ("system", "s"), ("user", "a"), ("assistant", "b"), ("tool", "o"), ("assistant", "c")]


def test_chat_system_prompt_only_when_no_system_turn():
    plain = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    first = to_example(plain, "chat", "d.jsonl", 1, system_prompt="S")["messages"][0]
    assert first == {"role": "system", "content": "S"}
    own = {"messages": [{"role": "system", "content": "mine"}] + plain["messages"]}
    assert to_example(own, "chat", "d.jsonl", 1, system_prompt="S")["messages"] == own["messages"]


def test_chat_with_no_assistant_turn():
    with raises("d.jsonl:4: chat in 'messages' has no assistant turn"):
        to_example({"messages": [{"role": "user", "content": "a"}]}, "chat", "d.jsonl", 4)


def test_chat_unknown_role():
    with raises("d.jsonl:1: field 'conversations[1].from' is 'robot'; known roles: system, user, human"):
        to_example({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
                   "chat", "d.jsonl", 1)


def test_chat_content_must_be_a_string():
    with raises("d.jsonl:2: field 'messages[1].content' must be a string, got null"):
        to_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]},
                   "chat", "d.jsonl", 2)


def test_chat_missing_messages_and_missing_keys():
    with raises("d.jsonl:1: record has no 'messages' field (format=chat expects messages: [{role, content}, ...] "
                "or conversations: [{from, value}, ...])"):
        to_example({"text": "x"}, "chat", "d.jsonl", 1)
    with raises("d.jsonl:1: field 'messages[0]' has no 'content'"):
        to_example({"messages": [{"role": "user"}]}, "chat", "d.jsonl", 1)


# Converting: text


def test_text():
    assert to_example({"text": "hello"}, "text", "d.jsonl", 1) == {"text": "hello"}
    with raises("d.jsonl:5: field 'text' is empty"):
        to_example({"text": ""}, "text", "d.jsonl", 5)
    with raises("d.jsonl:6: record has no 'text' field (format=text expects text)"):
        to_example({"content": "x"}, "text", "d.jsonl", 6)


# Preparing: errors that surface before any worker starts, and the counts


def test_prepare_names_the_bad_record(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, ALPACA, {"instruction": "x"}])
    with raises(f"{path}:3: record has no 'output' field"):
        prepare(config(path), tokenizer, str(tmp_path / "out"))


def test_prepare_missing_file(tmp_path, tokenizer):
    with raises(f"{tmp_path}/nope.jsonl: file does not exist"):
        prepare(config(str(tmp_path / "nope.jsonl")), tokenizer, str(tmp_path / "out"))


def test_prepare_empty_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ["", ""])
    with raises(f"{path}: the file holds no records"):
        prepare(config(path), tokenizer, str(tmp_path / "out"))


def long_record(words: int) -> dict:
    return {**ALPACA, "output": " ".join(["word"] * words)}


def test_over_long_example_truncate_counts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, long_record(200), ALPACA])
    stats = prepare(config(path, max_seq_len=64), tokenizer, str(tmp_path / "out"))
    assert stats["train"].items() >= {"records": 3, "examples": 3, "truncated": 1, "dropped": 0}.items()
    assert max(map(len, datasets.load_from_disk(str(tmp_path / "out" / "train"))["input_ids"])) <= 64


def test_over_long_example_drop_counts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, long_record(200), ALPACA])
    stats = prepare(config(path, max_seq_len=64, truncation="drop"), tokenizer, str(tmp_path / "out"))
    assert stats["train"]["examples"] == 2 and stats["train"]["dropped"] == 1
    assert stats["train"]["dropped_reasons"] == {"too_long": 1, "no_trainable_tokens": 0}


def test_over_long_example_error_names_line_and_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, long_record(200)])
    with pytest.raises(DataError, match=rf"{re.escape(path)}:2: example is \d+ tokens, longer than "
                                        r"trainer.max_seq_len=64 \(data.truncation=error\)"):
        prepare(config(path, max_seq_len=64, truncation="error"), tokenizer, str(tmp_path / "out"))


def test_truncation_leaving_no_trainable_token_is_dropped(tmp_path, tokenizer):
    long_prompt = {**ALPACA, "input": " ".join(["word"] * 200)}
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, long_prompt])
    stats = prepare(config(path, max_seq_len=64), tokenizer, str(tmp_path / "out"))
    assert stats["train"].items() >= {"examples": 1, "truncated": 0, "dropped": 1}.items()
    assert stats["train"]["dropped_reasons"]["no_trainable_tokens"] == 1


def test_empty_split_after_filtering_says_how_many_and_why(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [long_record(200), long_record(300)])
    with raises(f"{path}: the train split is empty after filtering: all 2 examples were dropped (2 longer than "
                f"trainer.max_seq_len=64 with data.truncation=drop"):
        prepare(config(path, max_seq_len=64, truncation="drop"), tokenizer, str(tmp_path / "out"))


def test_fewer_rows_than_one_global_batch_fails_before_training(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA] * 3)
    with raises(f"{path}: the training split has 3 rows (packed sequences when data.packing=true), fewer than "
                f"trainer.global_batch=8; trainer.global_batch must be at most 3"):
        prepare(config(path, global_batch=8, packing=False), tokenizer, str(tmp_path / "out"))


def test_prepare_writes_splits_and_reuses_them(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{**ALPACA, "output": str(i)} for i in range(20)])
    out = tmp_path / "out"
    stats = prepare(config(path, eval_fraction=0.25), tokenizer, str(out))
    assert (stats["train"]["records"], stats["eval"]["records"], stats["eval_generate"]) == (15, 5, 5)
    assert json.loads((out / "stats.json").read_text()) == stats
    assert len(datasets.load_from_disk(str(out / "train"))) == stats["train"]["rows"]
    first = json.loads((out / "eval_generate.jsonl").read_text().splitlines()[0])
    assert first["prompt"][-1]["role"] == "user" and first["reference"].isdigit()

    (out / "train" / "marker").write_text("kept when nothing changed")
    assert prepare(config(path, eval_fraction=0.25), tokenizer, str(out)) == stats
    assert (out / "train" / "marker").exists()

    changed = prepare(config(path, eval_fraction=0.25, max_seq_len=128), tokenizer, str(out))
    assert changed["fingerprint"] != stats["fingerprint"] and not (out / "train" / "marker").exists()


def test_held_out_split_is_seeded(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{**ALPACA, "output": str(i)} for i in range(20)])

    def references(seed):
        cfg = config(path, eval_fraction=0.25)
        cfg.seed = seed
        prepare(cfg, tokenizer, str(tmp_path / f"out{seed}"))
        return [json.loads(x)["reference"] for x in (tmp_path / f"out{seed}" / "eval_generate.jsonl").open()]

    assert references(0) == references(0) != references(1)


def test_text_format_prepares_without_a_template(tmp_path):
    bare = AutoTokenizer.from_pretrained(TINY)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "more text"}])
    stats = prepare(config(path, format="text"), bare, str(tmp_path / "out"))
    assert stats["train"]["examples"] == 2 and stats["eval_generate"] == 0
    assert "eval" not in stats and not (tmp_path / "out" / "eval").exists()


# Converting and encoding: preference pairs and prompts


def test_preference_layouts_give_one_canonical_pair():
    user = {"role": "user", "content": "Say hi."}
    hi, bye = {"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "bye"}
    expected = {"prompt": [user], "chosen": [hi], "rejected": [bye], "margin": None}
    standard = {"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"}
    conversational = {"prompt": [user], "chosen": [hi], "rejected": [bye]}
    implicit = {"chosen": [user, hi], "rejected": [user, bye]}  # TRL's implicit prompt: the shared opening
    sharegpt = {"prompt": [{"from": "human", "value": "Say hi."}], "chosen": [{"from": "gpt", "value": "hi"}],
                "rejected": [{"from": "gpt", "value": "bye"}]}
    for record in (standard, conversational, implicit, sharegpt):
        assert to_example(record, "preference", "p.jsonl", 1) == expected
    assert to_example({**standard, "margin": 2}, "preference", "p.jsonl", 1)["margin"] == 2.0
    with_system = to_example(standard, "preference", "p.jsonl", 1, system_prompt="Be brief.")
    assert with_system["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_a_preference_side_needs_an_answer():
    with raises("p.jsonl:4: field 'rejected' has no assistant turn"):
        to_example({"prompt": "Hi", "chosen": "hi", "rejected": [{"role": "user", "content": "x"}]},
                   "preference", "p.jsonl", 4)


def test_pair_labels_cover_each_response_only(tokenizer):
    from ftcluster.data.pairs import encode_pair
    from ftcluster.data.template import IGNORE

    example = to_example({"prompt": "Say hi.", "chosen": "hello there", "rejected": "no"}, "preference", "p", 1)
    row = encode_pair(example, tokenizer)
    for side, answer in (("chosen", "hello there"), ("rejected", "no")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
        assert trained == f"{answer}<|im_end|>"  # the answer and its end of turn, never the prompt
    prompt_len = next(i for i, label in enumerate(row["chosen_labels"]) if label != IGNORE)
    assert row["chosen_input_ids"][:prompt_len] == row["rejected_input_ids"][:prompt_len]


def test_prepare_pairs_and_prompts(tmp_path, tokenizer):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"}] * 3)
    cfg = apply_schema({"stage": {"name": "dpo"}, "data": {"path": pairs, "format": "preference", "packing": False},
                        "trainer": {"max_seq_len": 64, "global_batch": 2, "micro_batch_per_device": 1}})
    stats = prepare(cfg, tokenizer, str(tmp_path / "pairs"))
    assert stats["kind"] == "pairs" and stats["train"]["examples"] == 3
    assert set(datasets.load_from_disk(str(tmp_path / "pairs" / "train")).column_names) >= {
        "chosen_input_ids", "rejected_labels", "margin"}

    alpaca = write_jsonl(tmp_path / "a.jsonl", [ALPACA] * 4)
    cfg = apply_schema({"stage": {"name": "grpo", "rl": {"prompts_per_step": 2, "max_new_tokens": 8}},
                        "data": {"path": alpaca, "format": "alpaca"}, "trainer": {"max_seq_len": 64}})
    stats = prepare(cfg, tokenizer, str(tmp_path / "prompts"))
    row = datasets.load_from_disk(str(tmp_path / "prompts" / "train"))[0]
    assert stats["kind"] == "prompts" and json.loads(row["extra_json"]) == {"reference": "5"}
    assert tokenizer.decode(row["prompt_ids"]).endswith("2 and 3<|im_end|>\n<|im_start|>assistant\n")
