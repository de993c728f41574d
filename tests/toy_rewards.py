"""Reward functions for the RL tests (named in the config as tests/toy_rewards.py:NAME)."""


def digit_share(prompt, completion, **fields):
    """The share of the answer's characters that are digits: a random tiny model emits some, and a policy
    that learns to emit more scores higher."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def raises(prompt, completion, **fields):
    raise ValueError("no score for this one")


def not_a_number(prompt, completion, **fields):
    return float("nan")


def kill_rollout_actors(prompt, completion, **fields):
    """digit_share, but from its 9th call on (step 2), first SIGKILLs every rollout actor's process: an
    engine that dies mid-run."""
    kill_rollout_actors.calls = getattr(kill_rollout_actors, "calls", 0) + 1
    if kill_rollout_actors.calls == 9:
        import os
        import signal

        import psutil

        for process in psutil.process_iter(["cmdline"]):
            if any("RolloutWorker" in part for part in process.info["cmdline"] or []):
                os.kill(process.pid, signal.SIGKILL)
    return digit_share(prompt, completion)
