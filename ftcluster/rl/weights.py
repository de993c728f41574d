"""The policy's weights as a rollout engine takes them, and their fingerprint.

A vLLM engine knows nothing of peft: it needs the whole model under Hugging Face names, with each LoRA
layer's update folded into its base weight. That fold is computed here from a consolidated state dict
(the same one export writes), out of place: merging into the live model and unmerging after would add a
rounding error to the frozen base at every sync.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"


def checksum(state: dict) -> float:
    """A cheap fingerprint of a set of weights: their sum of squares, accumulated in float64 where the tensors
    are (on the device: one read-back, not a host copy of every tensor). Unchanged by how an engine fuses
    projections, so a receiver can compare its own with the sender's."""
    if not state:
        return 0.0
    return float(sum(torch.linalg.vector_norm(t.detach().flatten(), dtype=torch.float64) ** 2 for t in state.values()))


def to_arrays(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """Host tensors as numpy arrays (with their torch dtype), which Ray's object store hands to readers on the
    same node without a copy; a pickled tensor is copied on the way in and again on the way out (1.2 s
    against 0.002 s per read for SmolLM2's 540 MB). Dtypes numpy lacks (bf16) travel as same-width integers."""
    out = {}
    for name, tensor in state.items():
        host = tensor.detach().cpu().contiguous()
        if host.dtype in _AS_INTEGERS:
            host = host.view(_AS_INTEGERS[host.dtype])
        out[name] = (host.numpy(), str(tensor.dtype).removeprefix("torch."))
    return out


def from_arrays(arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    """The inverse of to_arrays; the tensors share the arrays' (read-only) memory, so load them by copying."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(array).view(getattr(torch, dtype)) for name, (array, dtype) in arrays.items()}


_AS_INTEGERS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """{module name: alpha / r (or the rsLoRA scale)} of every LoRA layer of a peft model."""
    return {name: module.scaling[ADAPTER] for name, module in model.named_modules()
            if isinstance(getattr(module, "scaling", None), dict) and ADAPTER in module.scaling}


def merged_lora_state(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A peft model's consolidated state dict -> the plain model's, each LoRA base weight W replaced by
    W + scaling * B @ A (computed in float32, returned in W's dtype), adapter tensors dropped."""
    merged = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        if name.endswith(".base_layer.weight"):
            module = name[:-len(".base_layer.weight")]
            a, b = state[f"{module}.lora_A.{ADAPTER}.weight"], state[f"{module}.lora_B.{ADAPTER}.weight"]
            tensor = torch.addmm(tensor.float(), b.float(), a.float(), alpha=scalings[module]).to(tensor.dtype)
        merged[_plain_name(name)] = tensor
    return merged


def decoder_layers_only(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """The tensors inside the decoder layers (".layers.N."), where LoRA's targets usually sit: with the base
    frozen, the embeddings, the output head and the final norm never change after the first sync. Whole
    layers are kept, not only the adapted projections, so an engine that fuses q/k/v or gate/up gets every
    part. The whole state when a LoRA target lies outside the layers (or the model names them otherwise)."""
    kept = {name: tensor for name, tensor in state.items() if _IN_LAYER.search(name)}
    adapted = {_plain_name(f"{module}.weight") for module in scalings}
    return kept if adapted <= kept.keys() else state


_IN_LAYER = re.compile(r"\.layers\.\d+\.")


def split_aliases(state: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[dict, dict[str, str]]:
    """The state without the second names of shared parameters (a tied output head is the input embedding),
    and {second name: first name}: each tensor is sent and counted in the checksum once, and the receiver
    restores both names (vLLM reloads a tied head from its own name)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        name = _plain_name(name)
        if id(param) in first and name in state:
            aliases[name] = first[id(param)]
        first.setdefault(id(param), name)
    return {k: v for k, v in state.items() if k not in aliases}, aliases


def with_aliases(state: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    return {**state, **{alias: state[name] for alias, name in aliases.items()}}


def _plain_name(name: str) -> str:
    name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    return name.replace(".base_layer.", ".")
