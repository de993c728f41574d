"""Reward model and DPO through real runs: 2 Ray workers (one rank in this process for the fast tier),
DeepSpeed, the tiny model, the bundled pairs."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from helpers import INLINE, PAIRS, train
from ftcluster.observe.track import read_metrics


def rows(run, key):
    return [(r["step"], r[key]) for r in read_metrics(run) if key in r]


@pytest.mark.slow
def test_reward_model_learns_and_final_scores_text(reward_model_run):
    run = reward_model_run
    accuracy = rows(run, "eval_accuracy")
    assert [step for step, _ in accuracy] == [0, 12]
    assert accuracy[-1][1] >= 0.8 > accuracy[0][1] + 0.2
    assert rows(run, "eval_margin")[-1][1] > 0
    # final/ is a sequence classifier that scores a rendered conversation the way training did.
    assert final_accuracy(run / "final") == pytest.approx(accuracy[-1][1], abs=0.021)  # at most one pair in 50 differs


def test_reward_model_on_one_rank_in_this_process(tmp_path):
    """stage=rm on launcher=inline: evaluated before and after, and final/ scores the held-out pairs as the
    last evaluation did. (The fast tier's reward model; learning is checked above, on 2 workers.)"""
    run = tmp_path / "rm"
    train(run, *INLINE, "stage=rm", *PAIRS, "strategy=zero2", "trainer.max_steps=2", "trainer.eval_every_steps=2",
          "optim.lr=3e-3")
    assert [step for step, _ in rows(run, "loss")] == [1, 2]
    accuracy = rows(run, "eval_accuracy")
    assert [step for step, _ in accuracy] == [0, 2]
    assert final_accuracy(run / "final") == pytest.approx(accuracy[-1][1], abs=0.021)


def final_accuracy(final) -> float:
    """The share of the bundled held-out pairs whose chosen answer final/ scores above the rejected one."""
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)

    def score(prompt, answer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits.item()

    right = [score(p["prompt"], p["chosen"]) > score(p["prompt"], p["rejected"]) for p in _eval_pairs()]
    return sum(right) / len(right)


def _eval_pairs():
    from ftcluster.config import ASSETS

    path = ASSETS / "data" / "json_extract" / "pairs_eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


DPO = ["stage=dpo", *PAIRS, "stage.dpo.sft_weight=0", "trainer.max_steps=10", "trainer.eval_every_steps=10", "optim.lr=3e-3",
       "trainer.eval_generate=false"]


@pytest.mark.slow
def test_dpo_raises_held_out_accuracy_and_reuses_its_reference_cache(tmp_path):
    """ZeRO-3 computes the reference log-probs once, with a frozen copy partitioned like the policy, and
    caches them; a ZeRO-0 run on the same model and data reads them (no reference forward at all) and
    follows the same trajectory."""
    cache = tmp_path / "reference_cache"
    first, second = tmp_path / "zero3", tmp_path / "zero0"
    train(first, *DPO, "strategy=zero3", f"stage.dpo.reference_cache_dir={cache}")
    assert rows(first, "reference_cache_hit") == [(0, 0)]
    assert rows(first, "reference_forward_batches")[0][1] > 0
    assert len(list(cache.iterdir())) == 1

    accuracy = rows(first, "eval_rewards_accuracy")
    assert accuracy[0] == (0, 0.5)  # policy == reference: every implicit reward is 0, each pair a tie
    assert accuracy[-1][1] >= 0.7
    assert rows(first, "eval_rewards_margin")[-1][1] > 0

    train(second, *DPO, "strategy=zero0", f"stage.dpo.reference_cache_dir={cache}")
    assert rows(second, "reference_cache_hit") == [(0, 1)]
    assert rows(second, "reference_forward_batches") == [(0, 0)]
    assert [v for _, v in rows(second, "loss")] == pytest.approx([v for _, v in rows(first, "loss")], rel=1e-4)
    assert rows(second, "eval_rewards_accuracy")[-1][1] == pytest.approx(accuracy[-1][1], abs=0.021)


def test_lora_dpo_reference_is_the_policy_without_its_adapters(tmp_path):
    """With LoRA the reference is the policy with its adapters disabled. At step 1 the adapters are still
    zero, so policy and reference agree exactly; computed live every step, or once into the cache, the
    reference gives the same losses. (One rank, in this process: the numerics, not the placement.)"""
    common = [*DPO, "peft=lora", "peft.r=4", "trainer.max_steps=3", "trainer.eval_every_steps=0",
              f"stage.dpo.reference_cache_dir={tmp_path / 'cache'}"]
    train(tmp_path / "live", *INLINE, *common, "stage.dpo.reference=live")
    train(tmp_path / "cached", *INLINE, *common)
    live = [r for r in read_metrics(tmp_path / "live") if "loss" in r]
    assert live[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0)
    assert live[0]["rewards_chosen"] == live[0]["rewards_rejected"] == 0 and live[1]["rewards_margin"] != 0
    # One reference forward per micro-batch: 8 pairs a step in micro-batches of 2.
    assert live[1]["reference_forward_batches"] - live[0]["reference_forward_batches"] == 4
    assert not [r for r in read_metrics(tmp_path / "live") if "reference_cache_hit" in r]
    cached = [r["loss"] for r in read_metrics(tmp_path / "cached") if "loss" in r]
    assert cached == pytest.approx([r["loss"] for r in live], rel=1e-5)
    assert (tmp_path / "live" / "final" / "adapter" / "adapter_model.safetensors").is_file()
