"""The search space of `sweep.params`: `key: distribution(args)` strings, parsed without eval, turned into Ray
Tune domains (sweep.backend=ray) or into a list of points (sweep.backend=slurm, where every point is submitted at
once).

    loguniform(a, b)   floats, log-uniform in [a, b]; 0 < a < b
    uniform(a, b)      floats, uniform in [a, b]; a < b
    randint(a, b)      integers a..b, both included; a < b
    choice(v1, ...)    one of the values, drawn (grid search enumerates them)
    grid(v1, ...)      every value in turn (search=grid)

Values are numbers, true/false/null, quoted or bare strings (choice(cosine, linear)) and lists ([q_proj, v_proj]).
"""

from __future__ import annotations

import ast
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping

from ftcluster.errors import ConfigError

DISTRIBUTIONS = {"loguniform": "loguniform(a, b)", "uniform": "uniform(a, b)", "randint": "randint(a, b)",
                 "choice": "choice(v1, v2, ...)", "grid": "grid(v1, v2, ...)"}
FINITE = ("choice", "grid")
_WORDS = {"true": True, "false": False, "null": None, "none": None}


@dataclass(frozen=True)
class Param:
    key: str  # a dotted config key, e.g. optim.lr
    kind: str  # one of DISTRIBUTIONS
    args: tuple

    @property
    def where(self) -> str:
        return f"sweep.params.{self.key}"

    def probes(self) -> list:
        """Values that stand for the whole range when checked against the schema: every finite value; for a
        float range its ends and a point inside that is no round number (an int key must refuse it)."""
        if self.kind in FINITE:
            return list(self.args)
        a, b = self.args
        if self.kind == "randint":
            return [a, b]
        inside = math.exp(math.log(a) + 0.37 * (math.log(b) - math.log(a))) if self.kind == "loguniform" \
            else a + 0.37 * (b - a)
        return [float(a), inside, float(b)]

    def sample(self, rng: random.Random) -> Any:
        a = self.args
        if self.kind in FINITE:
            return a[rng.randrange(len(a))]
        if self.kind == "randint":
            return rng.randint(a[0], a[1])
        if self.kind == "uniform":
            return rng.uniform(a[0], a[1])
        return math.exp(rng.uniform(math.log(a[0]), math.log(a[1])))

    def tune_domain(self, search: str):
        from ray import tune  # not at the top: sweep.backend=slurm and the sweep's checks run without Ray

        a = self.args
        if search == "grid" or self.kind == "grid":
            return tune.grid_search(list(a))
        if self.kind == "choice":
            return tune.choice(list(a))
        if self.kind == "randint":
            return tune.randint(a[0], a[1] + 1)  # Ray's upper bound is exclusive
        return tune.loguniform(a[0], a[1]) if self.kind == "loguniform" else tune.uniform(a[0], a[1])


def parse_space(params: Mapping) -> list[Param]:
    """sweep.params, flat (optim.lr: ...) or nested (optim: {lr: ...}), as Params in the order written."""
    return [parse(key, expr) for key, expr in _flatten(params, "").items()]


def parse(key: str, expr: Any) -> Param:
    where = f"sweep.params.{key}"
    usage = ", ".join(DISTRIBUTIONS.values())
    if not isinstance(expr, str):
        raise ConfigError(where, f"got {expr!r}; write a distribution as a string: {usage}")
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(where, f"{expr!r} is not a distribution; write one of {usage}") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.keywords:
        raise ConfigError(where, f"{expr!r} is not a distribution; write one of {usage}")
    name = node.func.id
    if name not in DISTRIBUTIONS:
        raise ConfigError(where, f"unknown distribution {name!r} in {expr!r}; use one of {usage}")
    args = tuple(_literal(arg, where, expr) for arg in node.args)
    _check_args(where, name, args)
    return Param(key, name, args)


def _literal(node: ast.AST, where: str, expr: str) -> Any:
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (int, float, str))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, ast.Constant) and _is_number(node.operand.value):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, ast.Name):  # a bare word: choice(cosine, linear)
        return _WORDS.get(node.id.lower(), node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item, where, expr) for item in node.elts]
    raise ConfigError(where, f"{ast.unparse(node)!r} in {expr!r} is not a plain value (a number, true/false/null, "
                             f"a string or a [list])")


def _check_args(where: str, name: str, args: tuple) -> None:
    if name in FINITE:
        if not args:
            raise ConfigError(where, f"{name}() needs at least one value, e.g. {name}(8, 16, 32)")
        return
    if len(args) != 2 or not all(_is_number(a) for a in args):
        raise ConfigError(where, f"{name} takes two numbers, {DISTRIBUTIONS[name]}; got {name}{_show(args)}")
    low, high = args
    if name == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(where, f"randint takes two integers; got randint{_show(args)} (for floats use uniform)")
    if not low < high:
        raise ConfigError(where, f"{name}{_show(args)}: the lower bound must be below the upper bound")
    if name == "loguniform" and low <= 0:
        raise ConfigError(where, f"loguniform{_show(args)}: both bounds must be positive (a log scale has no 0); "
                                 f"use uniform for a range that includes 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(args: tuple) -> str:
    return "(" + ", ".join(map(repr, args)) + ")"


def _flatten(params: Mapping, prefix: str) -> dict:
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def grid_points(space: list[Param]) -> list[dict]:
    """Every combination of the (finite) values, the last key varying fastest."""
    return [dict(zip([p.key for p in space], values)) for values in itertools.product(*(p.args for p in space))]


def random_points(space: list[Param], trials: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{p.key: p.sample(rng) for p in space} for _ in range(trials)]
