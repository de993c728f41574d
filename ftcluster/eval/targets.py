"""What `eval.model` / `eval.baseline` name, found from files alone (no weights are read), and how to turn
that into a folder a worker loads.

A spec is a Hugging Face folder (a run's final/, or the run folder itself), an adapter folder
(adapter_config.json, applied on the base it names), a checkpoints/step-N folder (exported to a folder
first), `bundled:NAME`, or the name of a conf/model/ group (tiny, smollm2, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftcluster.config import conf_dir, load_run_config
from ftcluster.errors import ConfigError
from ftcluster.train import checkpoint
from ftcluster.train.bundled import MODELS, PREFIX, resolve_model_path
from ftcluster.train.export import export_checkpoint
from ftcluster.train.random_init import materialize_random_init

# With these methods and export.merge, a run's final/ holds merged weights; otherwise the base weights,
# and final/adapter/ is what was trained.
_MERGEABLE = ("lora", "dora", "qlora")
_FORMS = ("a Hugging Face folder (config.json, such as a run's final/), an adapter folder (adapter_config.json), "
          "a checkpoints/step-N folder (trainer_state.json), bundled:NAME or a conf/model/ name")


@dataclass(frozen=True)
class Target:
    spec: str  # as the user wrote it
    kind: str  # folder | adapter | checkpoint | bundled | random (a config-only folder given seeded weights)
    path: str  # the folder (adapter: the adapter's; checkpoint: the step-N folder), or bundled:NAME
    base: str | None = None  # an adapter's base model folder
    run_dir: str | None = None  # the run it comes from, when it comes from one


def resolve(spec: str, key: str) -> Target:
    if spec.startswith(PREFIX):
        return _bundled(spec, spec, key)
    path = Path(spec).expanduser()
    if path.exists():
        return _from_folder(path, spec, key)
    group = conf_dir() / "model" / f"{spec}.yaml"
    if "/" not in spec and group.is_file():
        node = OmegaConf.load(group)
        return from_model_section(node.path, node.get("init", "pretrained"), spec, key)
    known = ", ".join(sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml")))
    raise ConfigError(key, f"{spec} does not exist; give {_FORMS} ({known})")


def from_model_section(path: str | None, init: str, spec: str, key: str) -> Target:
    """A `model` group's path and init (random: seeded weights for a config-only folder)."""
    if path is None:
        raise ConfigError(key, f"no model to evaluate: set {key}= {_FORMS}")
    if path.startswith(PREFIX):
        return _bundled(path, spec, key)
    if init == "random":
        if not Path(path, "config.json").is_file():
            raise ConfigError(key, f"{path} is not a Hugging Face model folder (no config.json)")
        return Target(spec, "random", path)
    return _from_folder(Path(path), spec, key)


def _bundled(path: str, spec: str, key: str) -> Target:
    if path[len(PREFIX):] not in MODELS:
        raise ConfigError(key, f"unknown bundled model {path!r}; known: {', '.join(PREFIX + n for n in MODELS)}")
    return Target(spec, "bundled", path)


def _from_folder(path: Path, spec: str, key: str) -> Target:
    if not path.is_dir():
        raise ConfigError(key, f"{spec} is a file, not a model folder; give {_FORMS}")
    if _is_run(path) and (path / "final").is_dir():
        path = path / "final"
    run = _run_of(path)
    if (path / checkpoint.STATE_FILE).is_file():
        if run is None:
            raise ConfigError(key, f"{spec} is a checkpoint outside its run folder: exporting it needs the run's "
                                   f"config.yaml two levels up (<run>/checkpoints/step-N)")
        kind = checkpoint.read_state(path).get("model_kind", "causal_lm")
        if kind != "causal_lm":
            raise ConfigError(key, f"{spec} is a checkpoint of a {kind} model (stage=rm or a critic); eval scores "
                                   f"text a causal LM generates")
        return Target(spec, "checkpoint", str(path), run_dir=str(run))
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base, "config.json").is_file():
            raise ConfigError(key, f"the base model of the adapter {spec} ({base!r}, base_model_name_or_path in its "
                                   f"adapter_config.json) is not a model folder on this machine; fix that path")
        _require_causal_lm(Path(base), key)
        return Target(spec, "adapter", str(path), base=base, run_dir=str(run) if run else None)
    if (path / "config.json").is_file():
        _require_causal_lm(path, key)
        if (path / "adapter" / "adapter_config.json").is_file() and run and not merged(load_run_config(run / "config.yaml")):
            # An unmerged final/: the base weights, with what was trained in final/adapter/.
            return Target(spec, "adapter", str(path / "adapter"), base=str(path), run_dir=str(run))
        return Target(spec, "folder", str(path), run_dir=str(run) if run else None)
    raise ConfigError(key, f"{spec} is not a model folder: it has no config.json, adapter_config.json or "
                           f"{checkpoint.STATE_FILE}; give {_FORMS}")


def merged(run_cfg: DictConfig) -> bool:
    return run_cfg.peft.method in _MERGEABLE and bool(run_cfg.export.merge)


def _require_causal_lm(folder: Path, key: str) -> None:
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures):
        raise ConfigError(key, f"{folder} holds {architectures}, a scoring model (stage=rm); eval scores text a "
                               f"causal LM generates: give a policy's final/ or a base model")


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "manifest.json").is_file()


def _run_of(path: Path) -> Path | None:
    """The run folder holding `path` (final/, final/adapter/, checkpoints/step-N), if any."""
    for candidate in (path, path.parent, path.parent.parent):
        if _is_run(candidate):
            return candidate.resolve()
    return None


def run_config(target: Target) -> DictConfig | None:
    return load_run_config(Path(target.run_dir) / "config.yaml") if target.run_dir else None


def default_baseline(target: Target) -> str | None:
    """The model the target was tuned from: its run's starting model, or an adapter's base."""
    cfg = run_config(target)
    if cfg is not None:
        if cfg.model.init == "random":  # the run wrote the seeded starting weights here
            start = Path(target.run_dir) / "init_model"
            return str(start) if (start / "config.json").is_file() else None
        return cfg.model.path
    return target.base if target.kind == "adapter" else None


def materialize(target: Target, role: str, out: Path, seed: int,
                trust_remote_code: bool = False) -> tuple[str, str | None]:
    """(model folder, adapter folder or None) for a worker to load. May convert a bundled model, write
    seeded weights or export a checkpoint: run only after every check has passed."""
    if target.kind == "bundled":
        return resolve_model_path(target.path), None
    if target.kind == "random":
        return materialize_random_init(target.path, out / "models" / f"{role}-init", seed, trust_remote_code), None
    if target.kind == "checkpoint":
        # eval's own folder: an earlier eval's export there is replaced (overwrite), nothing else is
        exported = export_checkpoint(target.path, out / "models" / f"{role}-{Path(target.path).name}", merge=True,
                                     overwrite=True)
        if run_config(target).peft.method not in (*_MERGEABLE, "none"):
            return str(exported), str(exported / "adapter")  # prompt / prefix tuning cannot be merged
        return str(exported), None
    if target.kind == "adapter":
        return target.base, target.path
    return target.path, None
