"""Keeps run logs readable: library chatter that says nothing about the run is turned off."""

from __future__ import annotations

import os
import warnings


def quiet_libraries() -> None:
    """Imports torch and transformers (seconds): callers call it when they are about to use them."""
    import torch
    from transformers.utils import logging as hf_logging

    if not torch.cuda.is_available():
        # Otherwise DeepSpeed warns on every import that it fell back to its CPU accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices addressed to library developers, printed once per worker per step otherwise.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
