"""Prompts for the RL stages: token ids to generate from, plus what the reward needs to score the answer.

A row keeps the prompt's turns (a reward model re-renders them with its own tokenizer) and the record's
other fields (`extra`, e.g. a reference answer), both as JSON text, beside the ids.
"""

from __future__ import annotations

import json

from ftcluster.data.template import encode_prompt, prompt_and_reference


def as_prompt(example: dict) -> dict:
    """format=prompt examples as they are; alpaca and chat ones as the turns before their last answer,
    with that answer as `reference` (what the bundled reward functions compare with)."""
    if "prompt" in example:
        return example
    prompt, reference = prompt_and_reference(example)
    return {"prompt": prompt, "extra": {"reference": reference}}


def encode_prompt_row(example: dict, tokenizer) -> dict:
    return {"prompt_ids": encode_prompt(example["prompt"], tokenizer),
            "prompt_json": json.dumps(example["prompt"], ensure_ascii=False),
            "extra_json": json.dumps(example["extra"], ensure_ascii=False, default=str)}


def decode_row(row: dict) -> tuple[list[dict], dict]:
    return json.loads(row["prompt_json"]), json.loads(row["extra_json"])
