"""Loading checkpoint files without running code from them.

torch.load(weights_only=False) unpickles anything, so a checkpoint folder handed over by someone else (resume=PATH,
`ftcluster export`, `ftcluster eval` on a step-N folder) could run arbitrary code. DeepSpeed 0.19 loads its own
files that way inside engine.load_checkpoint (TorchCheckpointEngine.load) and zero_to_fp32. Within
weights_only_loads() every torch.load is made weights_only=True, with the few plain classes those files hold
allowed by name (a loss scaler, an enum, a dataclass of offsets, numpy's RNG state arrays): nothing they name can
execute code when rebuilt. A file that needs anything else is refused with a UserError naming it.
"""

from __future__ import annotations

import functools
import importlib
import pickle
import re
from contextlib import contextmanager
from typing import Iterator

from ftcluster.errors import UserError

# module, attribute: what DeepSpeed's model, optimizer and ZeRO files and ftcluster's rng_rank*.pt hold.
_ALLOWED = [
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
]


def _allowed() -> list:
    found = []
    for module, name in _ALLOWED:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed or numpy version: what it lacks cannot be in its files either
    import numpy

    # numpy's dtypes pickle by their class (numpy.dtypes.UInt32DType, ...): plain descriptors.
    found.extend(getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType"))
    return found


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load in this block (DeepSpeed's included) loads with weights_only=True."""
    import torch

    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(*args, **kwargs)
        except pickle.UnpicklingError as exc:
            where = args[0] if args else kwargs.get("f", "a checkpoint file")
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f" (it names {found.group(1)})" if found else ""
            raise UserError(f"{where}: refusing to load it, because it holds Python objects that could run code "
                            f"when loaded{what}. Only tensors and DeepSpeed's own state are accepted; load "
                            f"checkpoints only from runs you trust") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_allowed()):
            yield
    finally:
        torch.load = original


def load_weights(path, **kwargs):
    """torch.load of one file with weights_only=True and the allowed classes."""
    import torch

    with weights_only_loads():
        return torch.load(path, **kwargs)
