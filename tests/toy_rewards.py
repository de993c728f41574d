"""Reward functions for the RL tests (named in the config as tests/toy_rewards.py:NAME)."""


def digit_share(prompt, completion, **fields):
    """The share of the answer's characters that are digits: a random tiny model emits some, and a policy
    that learns to emit more scores higher."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def raises(prompt, completion, **fields):
    raise ValueError("no score for this one")


def not_a_number(prompt, completion, **fields):
    return float("nan")
