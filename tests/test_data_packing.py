"""Packing changes the layout, never the loss: checked with the real tiny model under sdpa, eager and the
per-example sdpa packed rows run under (ftcluster.train.attention)."""

import json
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ftcluster.config import ASSETS
from ftcluster.data.formats import to_example
from ftcluster.data.collate import collate, model_inputs
from ftcluster.data.packing import pack, packing_efficiency, unpacked
from ftcluster.data.template import IGNORE, encode_chat
from ftcluster.train.attention import VARLEN_SDPA, register

TINY = ASSETS / "models" / "tiny"
DATA = ASSETS / "data" / "json_extract" / "train.jsonl"


def synthetic(lengths):
    """Examples whose tokens name them: example i is [i*1000, i*1000+1, ...]."""
    return [(list(range(i * 1000, i * 1000 + n)), [IGNORE] + list(range(i * 1000 + 1, i * 1000 + n)))
            for i, n in enumerate(lengths)]


def segments(row):
    """Split a packed row back into its examples by their lengths."""
    assert sum(row["example_lengths"]) == len(row["input_ids"]) and len(row["example_lengths"]) == row["num_examples"]
    starts = [sum(row["example_lengths"][:k]) for k in range(len(row["example_lengths"]) + 1)]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def test_pack_keeps_every_example_exactly_once_and_says_where_each_begins():
    rng = random.Random(0)
    examples = synthetic([rng.randint(1, 50) for _ in range(200)])
    rows = pack(examples, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(r["num_examples"] for r in rows) == len(examples)
    found = [seg for row in rows for seg in segments(row)]
    assert sorted(tuple(ids) for ids, _ in found) == sorted(tuple(ids) for ids, _ in examples)
    for ids, labels in found:
        assert labels == [IGNORE] + ids[1:]
    assert packing_efficiency(rows, 64) > 0.9
    assert rows == pack(examples, 64)


def test_first_label_of_every_packed_example_is_ignored():
    # Even when an encoder left it set: the previous example's last token must not learn to predict it.
    rows = pack([([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5])], 8)
    assert rows == [{"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, IGNORE, 5],
                     "example_lengths": [3, 2], "num_examples": 2}]


def test_rows_digest_tells_the_same_tokens_split_into_other_examples():
    from ftcluster.data.assemble import rows_digest

    one = pack([([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5])], 8)
    other = [{**one[0], "example_lengths": [2, 3]}]  # same tokens and labels, other boundaries
    assert rows_digest(one) == rows_digest(pack([([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5])], 8))
    assert rows_digest(one) != rows_digest(other)


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="truncate first"):
        pack(synthetic([5, 9]), 8)


def test_collate_packed_flattens_the_rows_without_padding():
    batch = collate(pack(synthetic([3, 2, 4]), 5), pad_id=0, packed=True)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_examples", "num_tokens", "cu_seq_lens_q",
                          "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert batch["input_ids"].tolist() == [[2000, 2001, 2002, 2003, 0, 1, 2, 1000, 1001]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 2001, 2002, 2003, IGNORE, 1, 2, IGNORE, 1001]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 9] and batch["max_length_q"] == 4
    assert (int(batch["num_examples"]), int(batch["num_tokens"])) == (3, 9)


def test_collate_unpacked_has_attention_mask_and_leaves_positions_to_the_model():
    # The model's own positions (0.. on every row) are the right ones: the next test's losses say so.
    batch = collate(unpacked(synthetic([3, 1])), pad_id=7, packed=False)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_examples", "num_tokens"}
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].tolist() == [[0, 1, 2], [1000, 7, 7]]
    assert batch["labels"].tolist() == [[IGNORE, 1, 2], [IGNORE, IGNORE, IGNORE]]


@pytest.fixture(scope="module")
def chat_examples():
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    turns = [to_example(json.loads(line), "alpaca", str(DATA), i)["messages"]
             for i, line in enumerate(DATA.read_text().splitlines()[:12], 1)]
    # Chats of 1 to 3 exchanges plus a short one: varied lengths, so rows hold different numbers of
    # examples, batches need padding, and one block holds several trained spans.
    chats = [sum(turns[k:k + 1 + k % 3], []) for k in range(0, 12, 2)] + [turns[0][:1] + [
        {"role": "assistant", "content": "hi"}]]
    return [encode_chat(chat, tokenizer) for chat in chats]


def forward(model, batch):
    with torch.no_grad():
        # use_cache=False: with a cache, transformers does not detect packed sequences (see collate.py).
        return model(**model_inputs(batch, "cpu"), use_cache=False).logits


def token_loss(logits, labels):
    shifted = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted,
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((shifted != IGNORE).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN_SDPA])
def test_packed_and_unpacked_give_the_same_loss_and_logits(chat_examples, attn):
    register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), attn_implementation=attn).eval()
    packed_rows = pack(chat_examples, 384)
    assert [row["num_examples"] for row in packed_rows] == [2, 2, 3]
    packed_batch = collate(packed_rows, pad_id=2, packed=True)
    plain_batch = collate(unpacked(chat_examples), pad_id=2, packed=False)
    packed_logits, plain_logits = forward(model, packed_batch), forward(model, plain_batch)

    packed_loss, packed_count = token_loss(packed_logits, packed_batch["labels"])
    plain_loss, plain_count = token_loss(plain_logits, plain_batch["labels"])
    assert packed_count == plain_count == sum(sum(x != IGNORE for x in labels) for _, labels in chat_examples)
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-5, atol=0)

    by_tokens = {tuple(ids): i for i, (ids, _) in enumerate(chat_examples)}
    offset = 0  # the packed batch is the rows flattened end to end
    for row in packed_rows:
        for ids, _ in segments(row):
            i = by_tokens[tuple(ids)]
            torch.testing.assert_close(packed_logits[0, offset:offset + len(ids)], plain_logits[i, :len(ids)],
                                       rtol=1e-5, atol=1e-5)
            offset += len(ids)
