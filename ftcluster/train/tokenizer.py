"""Tokenizer loading, apart from the model: the driver, data preparation and evaluation load a tokenizer
without importing transformers' modeling stack (with DeepSpeed under it: seconds of a small machine's
start-up that launcher=processes' ranks spend importing the same libraries meanwhile).

AutoTokenizer itself imports torch (its model-config lookup): where the model folder's cached facts name the
class it chooses (ftcluster.train.model_facts, checked to load the same tokenizer), that class is loaded
directly."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers' import is what this module defers
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(model_dir: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """`trust_remote_code`: model.trust_remote_code, passed by every caller that has the config; without it a
    folder whose tokenizer is code of its own fails to load instead of running that code."""
    direct = _direct_class(model_dir, trust_remote_code)
    if direct is not None:
        return _ready(direct.from_pretrained(model_dir))
    from transformers import AutoTokenizer

    return _ready(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code))


def _ready(tokenizer):
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels are -100 there), so eos is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _direct_class(model_dir: str, trust_remote_code: bool):
    from ftcluster.train.model_facts import cached_facts

    facts = cached_facts(model_dir, trust_remote_code)
    if facts is None or facts.tokenizer_class is None:
        return None
    import transformers

    return getattr(transformers, facts.tokenizer_class, None)
