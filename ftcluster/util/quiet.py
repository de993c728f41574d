"""Keeps run logs readable: library chatter that says nothing about the run is turned off."""

from __future__ import annotations

import os
import sys
import warnings

from ftcluster.util.hardware import cuda_available


def quiet_libraries() -> None:
    """Quiets torch, transformers and DeepSpeed without importing them (a driver whose data is prepared never
    does): through the environment they read when imported, here and in the processes started from here, and
    directly for transformers when it is imported already."""
    if not cuda_available():
        # Otherwise DeepSpeed warns on every import that it fell back to its CPU accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices addressed to library developers, printed once per worker per step otherwise.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # transformers' log level, and the progress bars of huggingface_hub (which transformers' follow), as read at
    # their import.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # as the environment says, unless a user's own setting says otherwise
        from transformers.utils import logging as hf_logging

        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            hf_logging.set_verbosity_error()
        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()
