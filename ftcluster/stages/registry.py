"""Every training stage, declared once. Config validation, the driver, the worker, the RL controller,
data preparation and `ftcluster data stats` read these entries; nothing else lists stages.

Adding a stage: write its module (a `train(ctx)` entry), add its entry here and its conf/stage/<name>.yaml.

Plain data only (no torch, no stage module imported): validation reads it before anything heavy loads.
A stage module is imported when its entry is first called, by `StageSpec.entry()`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal, Protocol

DataKind = Literal["sequences", "pairs", "prompts"]
Runner = Literal["spmd", "rl"]

# What one record of each data kind is called in logs.
UNITS: dict[str, str] = {"sequences": "examples", "pairs": "preference pairs", "prompts": "prompts"}

# The fields a record of each non-sequence format needs, for the message when a stage gets the wrong format.
FORMAT_FIELDS = {"preference": "data.format=preference records with prompt, chosen and rejected",
                 "prompt": "data.format=prompt records with a prompt (or alpaca/chat records, whose last answer "
                           "becomes the reference)"}


class Stage(Protocol):
    """A stage's entry, `train(ctx)`: it runs the whole training of its stage on what it is handed and returns
    when the run is done or stopped early (with a checkpoint). For an spmd stage `ctx` is a
    ftcluster.train.context.StageContext (engine, loader, tracker... of this rank) and the function runs on every
    rank; for an rl stage it is a ftcluster.rl.context.RLContext (the phases of an RL step on role groups) and it
    runs once, in the launching process. A stage imports no launcher and no other stage."""

    def __call__(self, ctx: Any) -> None: ...


@dataclass(frozen=True)
class StageSpec:
    name: str
    # What a prepared row holds: a token sequence, a preference pair, or an RL prompt.
    data_kind: DataKind
    # The data.format values it trains on.
    formats: tuple[str, ...]
    # What the trained model is: ftcluster.train.model.MODEL_CLASSES.
    model_kind: Literal["causal_lm", "reward"]
    # spmd: one program on every rank (a launcher runs the worker entry per rank); rl: a controller in the
    # launching process places one actor group per role (needs Ray).
    runner: Runner
    # "module:function" called with the stage's context (StageContext for spmd, RLContext for rl).
    train: str

    @property
    def unit(self) -> str:
        """What one record is called in logs."""
        return UNITS[self.data_kind]

    def entry(self) -> Stage:
        module, function = self.train.split(":")
        return getattr(importlib.import_module(module), function)


# In this order, the first stage that trains on a format is the one `ftcluster data stats` assumes for it.
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("sft", "sequences", ("alpaca", "chat", "text"), "causal_lm", "spmd", "ftcluster.stages.sft:train"),
    StageSpec("dpo", "pairs", ("preference",), "causal_lm", "spmd", "ftcluster.stages.dpo:train"),
    StageSpec("rm", "pairs", ("preference",), "reward", "spmd", "ftcluster.stages.rm:train"),
    StageSpec("grpo", "prompts", ("prompt", "alpaca", "chat"), "causal_lm", "rl", "ftcluster.stages.grpo:train"),
    StageSpec("ppo", "prompts", ("prompt", "alpaca", "chat"), "causal_lm", "rl", "ftcluster.stages.ppo:train"),
)}


def stage(name: str) -> StageSpec:
    return STAGES[name]


def for_format(fmt: str) -> StageSpec:
    """The stage `ftcluster train` runs on data of this format by default."""
    return next(spec for spec in STAGES.values() if fmt in spec.formats)
