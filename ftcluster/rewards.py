"""Rewards for the RL stages: rule-based functions named in the config, checked sample by sample.

A reward function is called once per sample as `fn(prompt=..., completion=..., **fields)`: `prompt` is
the prompt's turns ([{role, content}, ...]), `completion` the decoded answer (special tokens removed),
and `fields` the prompt record's other fields (for alpaca and chat data, `reference`: the record's own
answer). It returns a finite number. stage.rl.reward_fn names it as "package.module:function" or
"path/to/file.py:function".
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Callable

from ftcluster.errors import ConfigError, UserError
from ftcluster.eval.scores import field_share, json_object

_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def json_match(prompt: list, completion: str, reference: str, **fields) -> float:
    """The bundled json_extract task: 1 for the exact compact JSON. Valid JSON otherwise scores 0.25, plus 0.5
    for the share s of the reference's fields it gets right, plus 0.25 x s x its compactness (the length of
    its compact form over its own), so a correct answer climbs from pretty-printed (about 0.93) through one
    line with spaces (about 0.98) to compact. An object found inside other text gets a quarter of s; 0
    otherwise. The prompt asks for compact JSON; the base model pretty-prints, and GRPO needs rewards that
    tell those apart by degrees."""
    answer = completion.strip()
    if answer == reference.strip():
        return 1.0
    expected = json.loads(reference)
    parsed = json_object(answer)
    if parsed is not None:
        share = field_share(parsed, expected)
        compactness = len(json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)) / len(answer)
        return 0.25 + 0.5 * share + 0.25 * share * min(1.0, compactness)
    found = _OBJECT.search(answer)
    inner = json_object(found.group(0)) if found else None
    return 0.25 * field_share(inner, expected) if inner is not None else 0.0


def exact_match(prompt: list, completion: str, reference: str, **fields) -> float:
    return float(completion.strip() == reference.strip())


def load_reward_fn(spec: str, key: str = "stage.rl.reward_fn") -> Callable[..., float]:
    """Import `module:function` or `file.py:function`; fails with the key and what to fix."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(key, f"{spec!r} must be package.module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise ConfigError(key, f"{path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"ftcluster_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # an import error of the user's module, whatever it is, is theirs to fix
        raise ConfigError(key, f"cannot import {target!r}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(key, f"{target!r} has no function {name!r}")
    return fn


def score_samples(fn: Callable, spec: str, samples: list[dict], step: int) -> list[float]:
    """fn over every sample ({prompt, completion, fields}); one UserError naming the sample if it raises
    or returns something that is not a finite number."""
    rewards = []
    for index, sample in enumerate(samples):
        where = (f"stage.rl.reward_fn={spec} on sample {index} of step {step} (completion "
                 f"{_excerpt(sample['completion'])}, prompt {_excerpt(_last_user(sample['prompt']))})")
        try:
            value = fn(prompt=sample["prompt"], completion=sample["completion"], **sample["fields"])
        except Exception as exc:
            raise UserError(f"{where} raised {type(exc).__name__}: {exc}") from None
        rewards.append(check_reward(value, where))
    return rewards


def check_reward(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where} returned {value!r} ({type(value).__name__}); a reward must be a finite number") from None
    if not math.isfinite(number) or isinstance(value, str):
        raise UserError(f"{where} returned {value!r}; a reward must be a finite number")
    return number


def _last_user(prompt: list) -> str:
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _excerpt(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")
