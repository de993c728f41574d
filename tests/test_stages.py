"""The stage registry against the stage modules and configs: every declared entry imports and takes the
context its runner hands it. In the fast tier this is the only touch of the PPO and GRPO modules, whose
runs need Ray actors (test_rl.py, slow)."""

import inspect
from pathlib import Path

import pytest

from ftcluster.stages.registry import STAGES

CONF = Path(__file__).resolve().parents[1] / "conf" / "stage"


def test_every_stage_has_a_config_and_every_config_a_stage():
    assert sorted(STAGES) == sorted(p.stem for p in CONF.glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_entry_imports_and_takes_its_runners_context(name):
    spec = STAGES[name]
    entry = spec.entry()
    assert inspect.isfunction(entry) and entry.__module__ == f"ftcluster.stages.{name}"
    (parameter,) = inspect.signature(entry).parameters.values()
    # spmd: the worker entry's StageContext on every rank; rl: the controller's RLContext.
    assert parameter.annotation == {"spmd": "StageContext", "rl": "RLContext"}[spec.runner]
