"""Hydra composition onto the schema, and the translation of Hydra's and OmegaConf's errors into one line that
names the key.

The YAML tree under conf/ supplies values; the schema supplies types and the set of keys that exist.
Composition merges the YAML onto the schema, so a misspelt key or a string where a number belongs fails with
the key's name instead of deep inside a worker.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcluster.config.schema import TrainConfig
from ftcluster.errors import ConfigError, DataError, UserError
from ftcluster.util.secrets import redact

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# The config groups of conf/: a complete config file (--config) may not be combined with them.
GROUPS = ("model", "data", "stage", "peft", "strategy", "launcher", "tracking", "sweep")


def conf_dir() -> Path:
    """The conf/ tree: the checkout's when running from source (an editable install maps it as
    ftcluster.conf; a checkout that is only on PYTHONPATH has it beside the package), the wheel's otherwise."""
    try:
        return Path(str(resources.files("ftcluster.conf")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "conf"


def _asset(relative: str) -> str:
    return str(ASSETS / relative)


if not OmegaConf.has_resolver("asset"):
    # ${asset:models/tiny} in conf/ points into the installed package, wherever it lives.
    OmegaConf.register_new_resolver("asset", _asset)


def compose(overrides: List[str], config_name: str = "train", config_file: Optional[str] = None) -> DictConfig:
    """Compose conf/<config_name>.yaml with command-line overrides onto the typed schema. With config_file, a
    complete config in a YAML file (a run's config.yaml, a sweep's best.yaml) takes the place of conf/train.yaml."""
    # Hydra is imported here, not at the top: workers load saved configs (apply_schema) without composing.
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, OverrideParseException

    # The schema is the first entry of conf/train.yaml's defaults list: every key exists (and can be
    # overridden without '+') with its type, before any YAML value lands on it.
    ConfigStore.instance().store(name="ftcluster_schema", node=TrainConfig)
    if config_file is not None:
        ConfigStore.instance().store(name="ftcluster_file", node=_config_file_node(config_file, overrides))
        config_name = "ftcluster_file"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            raw = hydra_compose(config_name=config_name, overrides=list(overrides))
    except OverrideParseException as exc:
        bad = str(exc).splitlines()[0].split(": ", 1)[-1]
        raise UserError(f"the override {bad!r} is not valid Hydra syntax: quote a value that holds spaces, quotes "
                        f"or special characters, e.g. key='it\\'s a value' (in a shell: \"key='it\\'s a value'\"); "
                        f"see https://hydra.cc/docs/advanced/override_grammar/basic") from None
    except HydraException as exc:
        raise UserError(_hydra_message(exc)) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(_key_of(exc), _omegaconf_message(exc)) from None
    return apply_schema(raw)


def _config_file_node(path: str, overrides: List[str]) -> dict:
    """The file's values on the schema, as a config node Hydra composes the overrides onto."""
    groups = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in GROUPS]
    if groups:
        raise UserError(f"--config {path} is a complete config: change values in it (e.g. model.path=DIR, "
                        f"trainer.max_steps=100), not groups ({groups[0]})")
    if not Path(path).is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        values = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(path, mark.line + 1 if mark else None, f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(values, dict):
        raise DataError(path, None, "expected a mapping of config keys (a run's config.yaml, a sweep's best.yaml)")
    return {"defaults": ["ftcluster_schema", "_self_"], **values}


def apply_schema(raw: DictConfig | dict) -> DictConfig:
    """Merge values onto the schema: unknown keys and wrong types fail with the key's name."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        _reject_unknown_keys(OmegaConf.create(raw) if isinstance(raw, dict) else raw, schema, "")
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_key_of(exc), _omegaconf_message(exc)) from None
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _reject_unknown_keys(node: DictConfig, schema: DictConfig, prefix: str) -> None:
    # Hydra's '+key=value' appends keys the schema does not have; they would be silently ignored.
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(dotted, f"no such key. {_keys_hint(schema, prefix)}")
        child, expected = node._get_node(key), schema._get_node(key)
        free_form = isinstance(expected, DictConfig) and OmegaConf.get_type(expected) is dict  # Dict[str, Any]
        if isinstance(child, DictConfig) and isinstance(expected, DictConfig) and not child._is_none() and not free_form:
            _reject_unknown_keys(child, expected, f"{dotted}.")


def schema_has(key: str) -> bool:
    """Whether a dotted key (e.g. trainer.max_steps) exists in the schema."""
    try:
        return OmegaConf.select(OmegaConf.structured(TrainConfig), key, throw_on_missing=False) is not None
    except OmegaConfBaseException:
        return False


def _keys_hint(schema: DictConfig, prefix: str) -> str:
    where = prefix.rstrip(".") or "the top level"
    return f"Keys of {where}: {', '.join(str(k) for k in schema.keys())}"


def _key_of(exc: OmegaConfBaseException) -> str:
    return str(getattr(exc, "full_key", None) or "?")


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    text = str(exc).splitlines()[0]
    if "not in struct" in text or "Key '" in text and "not" in text:
        return f"{text}. Check the spelling; `ftcluster train --help` lists the config groups and keys"
    return text


def _hydra_message(exc: Exception) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0]
    if first.startswith("Could not override '"):
        key = first.split("'")[1]
        if schema_has(key):  # the key exists; what it was given does not fit its type
            cause = str(exc.__cause__).splitlines()[0] if exc.__cause__ else "invalid value"
            return (f"config key '{key}': {cause}. For a free-form mapping, add entries one at a time: "
                    f"+{key}.NAME=VALUE")
        section, _, _ = key.rpartition(".")
        node = OmegaConf.select(OmegaConf.structured(TrainConfig), section) if section else None
        hint = _keys_hint(node, section + ".") if isinstance(node, DictConfig) else _keys_hint(
            OmegaConf.structured(TrainConfig), "")
        return f"config key '{key}': no such key. {hint}"
    if first.startswith("Error merging override "):
        override = first[len("Error merging override "):]
        cause = str(exc.__cause__).splitlines()[0] if exc.__cause__ else "invalid value"
        return f"config key '{override.split('=')[0]}': {cause} (from {override})"
    if "Could not find '" in first:
        missing = first.split("Could not find '")[1].split("'")[0]
        options = [line.strip() for line in text.splitlines() if line.startswith("\t") and "provider=" not in line]
        group, _, option = missing.rpartition("/")
        return f"config group '{group}' has no option '{option}'; available: {', '.join(options)} (in {conf_dir()})"
    return first


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as files and the console show it (config.yaml, `ftcluster config`): values under
    secret-looking keys and token-shaped values masked as ***. The run itself keeps the real values."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True))))


def load_run_config(path: str | Path) -> DictConfig:
    """Load a run's saved config.yaml back onto the schema."""
    return apply_schema(OmegaConf.load(path))
