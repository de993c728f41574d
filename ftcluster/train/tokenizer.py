"""Tokenizer loading, apart from the model: the driver, data preparation and evaluation load a tokenizer
without importing transformers' modeling stack (with DeepSpeed under it: seconds of a small machine's
start-up that launcher=processes' ranks spend importing the same libraries meanwhile)."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(model_dir: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """`trust_remote_code`: model.trust_remote_code, passed by every caller that has the config; without it a
    folder whose tokenizer is code of its own fails to load instead of running that code."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels are -100 there), so eos is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
