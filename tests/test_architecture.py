"""The package's import graph: layers without cycles.

Every `import` in ftcluster/ counts, function-local ones included (a lazy import is still a dependency).
Each module sits in a layer; an import may go to a lower layer, or stay inside its own package at the
same layer. Launchers place processes and know no stage, RL role or training internals; stages know no
launcher. A failure names the offending edge or cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ftcluster"

# Most specific prefix wins. Higher layers may import lower ones, never the other way.
LAYERS = {
    "ftcluster.cli": 8,
    # commands: one per CLI verb besides train
    "ftcluster.eval.command": 7, "ftcluster.sweep": 7, "ftcluster.bench": 7, "ftcluster.plan.command": 7,
    "ftcluster.data.tools": 7,
    # the driver: validate, prepare, choose the launcher and the entry, check the outcome
    "ftcluster.run": 6,
    # placement (launchers) and the entries they are handed (beside each other, never importing each other)
    "ftcluster.launch": 5, "ftcluster.train.worker": 5, "ftcluster.rl.controller": 5, "ftcluster.eval.scorer": 5,
    # algorithms: the stages, on RL roles
    "ftcluster.stages": 4.5, "ftcluster.rl": 4, "ftcluster.eval": 4,
    # training components
    "ftcluster.plan": 3.5, "ftcluster.train": 3, "ftcluster.eval.generate": 3,
    "ftcluster.objectives": 2.5, "ftcluster.data": 2, "ftcluster.observe": 2,
    # the typed config and the declarations everything reads
    "ftcluster.config": 1, "ftcluster.rewards": 1, "ftcluster.stages.registry": 0.5, "ftcluster.eval.scores": 0.5,
    # shared utilities, on the user-error types (which import nothing): util/outputs.py refuses with a UserError
    "ftcluster.util": 0, "ftcluster": 0, "ftcluster.errors": -1,
}
# Packages that may import only these, whatever the layers say: a launcher places processes and runs the
# callable it is handed, so it knows no stage, RL role, model, data or entry.
ONLY = {"ftcluster.launch": ("ftcluster.launch", "ftcluster.errors", "ftcluster.util", "ftcluster.observe")}
# Same-layer neighbours that must not know each other.
FORBIDDEN = [("ftcluster.train.worker", "ftcluster.launch"), ("ftcluster.rl.controller", "ftcluster.launch"),
             ("ftcluster.eval.scorer", "ftcluster.launch")]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "assets" in path.relative_to(PACKAGE).parts:
            continue
        dotted = ".".join(("ftcluster", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[dotted.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def layer_of(module: str) -> tuple[float, str]:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix], prefix


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in sorted(edges.items()):
        level, group = layer_of(source)
        for target in sorted(targets):
            target_level, target_group = layer_of(target)
            forbidden = any(_within(source, a) and _within(target, b) for a, b in FORBIDDEN) or any(
                _within(source, package) and not any(_within(target, ok) for ok in allowed)
                for package, allowed in ONLY.items())
            if forbidden or target_level > level or (target_level == level and target_group != group):
                bad.append(f"{source} (layer {level}) imports {target} (layer {target_level})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_upward_imports():
    assert upward_edges(import_graph()) == []


def test_checker_sees_upward_edges_and_cycles():
    """The checks themselves: a launcher importing a stage is a forbidden edge, a stage importing a launcher
    an upward one, and the two importing each other a cycle."""
    edges = {"ftcluster.launch.local": {"ftcluster.stages.sft"}, "ftcluster.stages.sft": {"ftcluster.launch.local"}}
    assert upward_edges(edges) == ["ftcluster.launch.local (layer 5) imports ftcluster.stages.sft (layer 4.5)",
                                   "ftcluster.stages.sft (layer 4.5) imports ftcluster.launch.local (layer 5)"]
    assert cycles(edges) == [["ftcluster.launch.local", "ftcluster.stages.sft"]]


def test_few_top_level_modules():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top == ["cli", "errors", "rewards"]


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_graph_sees_function_local_imports(tmp_path, monkeypatch):
    """A lazy import is an edge like any other."""
    package = tmp_path / "ftcluster"
    (package / "launch").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "launch" / "__init__.py").write_text("")
    (package / "launch" / "local.py").write_text("def f():\n    from ftcluster.stages import sft\n")
    (package / "stages").mkdir()
    (package / "stages" / "__init__.py").write_text("")
    (package / "stages" / "sft.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert import_graph()["ftcluster.launch.local"] == {"ftcluster.stages.sft"}


def test_stages_do_not_import_each_other():
    """What stages share lives below them (ftcluster.objectives, ftcluster.train, ftcluster.rl), so each stage
    can be read, changed or removed on its own. The registry is declarations, not a stage."""
    stages = {m for m in modules() if m.startswith("ftcluster.stages.") and m != "ftcluster.stages.registry"}
    edges = import_graph()
    assert sorted(f"{a} imports {b}" for a in stages for b in edges.get(a, ()) if b in stages) == []
