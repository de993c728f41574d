"""Build the tiny test model's folder: a ~1000-token byte-level BPE tokenizer and a 2-layer Llama config.

    python ftcluster/assets/models/tiny/build_tokenizer.py

The tokenizer mirrors SmolLM2-135M-Instruct's conventions so that the tiny model exercises the same code
paths as the real one: byte-level BPE with no prefix space, ids 0/1/2 = <|endoftext|>, <|im_start|>,
<|im_end|>; bos <|im_start|>, eos and pad <|im_end|>, unk <|endoftext|>; no automatic bos/eos; and
SmolLM2's ChatML template, default system prompt included. It is trained on the bundled json_extract data
plus some generic English, so those texts take few tokens. The weights are not stored: the model is
built with seeded random init from config.json. Running the script again gives the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "data" / "json_extract"
VOCAB_SIZE = 1000
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# SmolLM2-135M-Instruct's template as its GGUF ships it (tokenizer.chat_template), verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GENERIC = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Please answer the question in one short sentence.",
    "Write a short poem about the sea and the sky.",
    "Hello! How can I help you today?",
    "Thank you very much, that was really helpful.",
    "The weather today is sunny with a light breeze from the west.",
    "She opened the window and listened to the rain on the roof.",
    "Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in many texts.",
    "Explain the difference between a list and a dictionary in Python.",
    "The model was trained for twenty steps and the loss went down.",
    "A good answer is correct, short and easy to read.",
    "They walked to the market to buy bread, cheese and apples.",
    "Summarise the following paragraph in your own words.",
    "Is this review positive or negative? I loved the film.",
    "Translate the sentence into French: I like green tea.",
    "The train leaves at nine o'clock in the morning.",
    "Could you tell me more about the history of the city?",
    "This is a test of the tokenizer with some punctuation: (a), [b], {c}; \"d\" - e!",
]


# The training examples the tokenizer was built on: the first 200 (the second 200, added later to the data,
# are left out so that running this script again still gives the committed files).
TOKENIZER_TRAIN_ROWS = 200


def corpus() -> list[str]:
    texts = list(GENERIC)
    for name in ("train.jsonl", "eval.jsonl"):
        with open(DATA / name, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for line in lines[:TOKENIZER_TRAIN_ROWS] if name == "train.jsonl" else lines:
            row = json.loads(line)
            texts += [row["instruction"], row["input"], row["output"]]
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Same pre-tokenizer and decoder settings as SmolLM2's tokenizer.json.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,  # listed first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def main() -> None:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(HERE)
    build_config(len(tokenizer)).save_pretrained(HERE)
    print(f"wrote a {len(tokenizer)}-token tokenizer and config.json to {HERE}")


if __name__ == "__main__":
    main()
