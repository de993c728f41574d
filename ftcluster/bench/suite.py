"""A benchmark suite: the matrix in conf/bench/<name>.yaml, expanded into cells.

A suite file names the overrides every cell shares (`base`), the axes to sweep (`matrix`: any config key
or group, each with its list of values) and how long each cell runs (`warmup_steps`, then `measure_steps`
that are measured). A cell is one point of the Cartesian product: a list of `ftcluster train` overrides.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcluster.config import conf_dir, schema_has
from ftcluster.errors import UserError

# Config groups an axis may name directly (strategy: [zero0, zero3]); any other axis is a dotted key.
GROUPS = ("model", "data", "stage", "peft", "strategy", "launcher", "tracking")


@dataclass
class SuiteConfig:
    description: str = ""
    # Hardware profile (conf/cluster/) for peak FLOP/s and the planner; null: the machine's own.
    cluster: Optional[str] = None
    warmup_steps: int = 2
    measure_steps: int = 5
    # Time every collective for the communication share (it blocks the device after each collective).
    profile_comms: bool = True
    base: List[str] = field(default_factory=list)
    matrix: Dict[str, List[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    axes: tuple  # ((key, value), ...) in the suite's axis order

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={_value(value)}" for key, value in self.axes]

    @property
    def name(self) -> str:
        """Stable and readable: the cell's key in result files."""
        return ",".join(self.overrides)

    @property
    def folder(self) -> str:
        """The folder the cell runs in: its name with what paths and Hydra overrides cannot hold replaced."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)


@dataclass
class Suite:
    name: str
    path: Path
    config: SuiteConfig

    @property
    def axes(self) -> list[str]:
        return list(self.config.matrix)

    def cells(self) -> list[Cell]:
        keys = self.axes
        return [Cell(tuple(zip(keys, values))) for values in itertools.product(*self.config.matrix.values())]


def suite_dir() -> Path:
    return conf_dir() / "bench"


def known() -> list[str]:
    return sorted(p.stem for p in suite_dir().glob("*.yaml"))


def load(name_or_path: str) -> Suite:
    """conf/bench/<name>.yaml, or a suite file anywhere; checked for shape before any cell runs."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = suite_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"suite={name_or_path}: no such suite; known: {', '.join(known())} "
                        f"(conf/bench/), or give a path to a suite .yaml")
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SuiteConfig), OmegaConf.load(path)))
    except OmegaConfBaseException as exc:
        raise UserError(f"{path}: {exc.msg if hasattr(exc, 'msg') else exc}".splitlines()[0]) from None
    suite = Suite(path.stem, path, config)
    _check(suite)
    return suite


def _check(suite: Suite) -> None:
    c = suite.config
    for key, values in c.matrix.items():
        if key not in GROUPS and not schema_has(key):
            raise UserError(f"{suite.path}: matrix axis {key!r} is neither a config group ({', '.join(GROUPS)}) "
                            f"nor a config key; see `ftcluster config` for the keys")
        if not isinstance(values, list) or not values:
            raise UserError(f"{suite.path}: matrix axis {key!r} needs a non-empty list of values, got {values!r}")
    if not c.matrix or not suite.cells():
        raise UserError(f"{suite.path}: the matrix has no cells; give at least one axis with one value, "
                        f"e.g. matrix: {{strategy: [zero2]}}")
    if c.measure_steps < 1 or c.warmup_steps < 0:
        raise UserError(f"{suite.path}: warmup_steps must be >= 0 and measure_steps >= 1 "
                        f"(got {c.warmup_steps} and {c.measure_steps})")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
