"""The house rules that keep fedsim easy to enter: rooms, registries, imports.

- No import cycle between rooms (a package of ``fedsim``, ``actors``, ``aggregation``, or a
  module directly under ``fedsim/``), counting imports inside functions too; only imports under
  ``if TYPE_CHECKING:`` (never executed) are left out.
- ``fedsim.config`` imports nothing of fedsim but ``fedsim.errors``, ``fedsim.experiments`` (the
  shipped experiments' names) and the torch-free ``aggregation.registry``: importing it loads
  neither torch nor any method.
- Every registry string names a class that exists, and what the registry says of a plug-in
  agrees with the plug-in's own flags.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsim", "actors", "aggregation")


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module of ours that ``name`` (a module or ``module.attribute``) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def import_edges() -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: line}, every executed import statement."""
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                if target.split(".")[0] not in PACKAGES:
                    continue
                owner = _owner(target)
                if owner and owner != name:
                    edges[name].setdefault(owner, node.lineno)
    return edges


def room(module: str) -> str:
    """``fedsim.tracking.tracker`` -> ``fedsim.tracking``; ``actors.client`` -> ``actors``;
    a module right under ``fedsim/`` is a room of its own."""
    parts = module.split(".")
    if parts[0] != "fedsim" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def _explain(cycle: list[str], edges: dict[str, dict[str, int]]) -> str:
    members = set(cycle)
    lines = [
        f"  {MODULES[a].relative_to(ROOT)}:{line} imports {b}"
        for a, targets in sorted(edges.items())
        for b, line in sorted(targets.items())
        if room(a) in members and room(b) in members and room(a) != room(b)
    ]
    return f"rooms {cycle} import each other:\n" + "\n".join(lines)


def test_the_walker_sees_imports_inside_functions():
    edges = import_edges()
    # fedsim.tracking.store imports fedsim.config at the top; fedsim.cli imports the study
    # inside a function: both are edges
    assert "fedsim.config" in edges["fedsim.tracking.store"]
    assert "fedsim.simulation.study" in edges["fedsim.cli"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_rooms():
    edges = import_edges()
    graph: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if room(a) != room(b):
                graph[room(a)].add(room(b))
    cycles = _cycles(graph)
    assert not cycles, "\n".join(_explain(c, edges) for c in cycles)


def test_no_import_cycle_between_modules():
    edges = import_edges()
    cycles = _cycles({a: set(targets) for a, targets in edges.items()})
    assert not cycles, f"modules that import each other: {cycles}"


def test_config_imports_nothing_of_fedsim_but_errors():
    allowed = {"fedsim.errors", "fedsim.experiments", "aggregation.registry", "aggregation"}
    for name, targets in import_edges().items():
        if room(name) == "fedsim.config":
            outside = {t for t in targets if room(t) != "fedsim.config"} - allowed
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_shipped_experiments_module_imports_nothing_of_fedsim_but_errors():
    # the command line resolves an experiment's name before Ray starts: it stays a leaf
    assert set(import_edges()["fedsim.experiments"]) <= {"fedsim.errors"}


def test_aggregation_imports_nothing_of_fedsim_or_actors():
    for name, targets in import_edges().items():
        if room(name) == "aggregation":
            assert all(room(t) == "aggregation" for t in targets), (name, targets)


def test_only_the_wiring_layer_imports_actors():
    wiring = {"fedsim.simulation", "fedsim.cli", "actors"}
    for name, targets in import_edges().items():
        if any(room(t) == "actors" for t in targets):
            assert room(name) in wiring, f"{name} imports actors"


def test_importing_the_config_loads_neither_torch_nor_a_method():
    code = (
        "import sys\n"
        "import fedsim.config\n"
        "from fedsim.config import FedSimConfig\n"
        "cfg = FedSimConfig()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'mlflow')"
        " or m.startswith('fedsim.methods') or m.startswith('transformers'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_no_exported_aggregation_name_is_also_a_submodule():
    import aggregation

    submodules = {path.stem for path in (ROOT / "aggregation").glob("*.py")}
    assert not set(aggregation.__all__) & submodules


def test_every_lazy_aggregation_name_resolves():
    import aggregation

    for name in aggregation.__all__:
        assert getattr(aggregation, name) is not None, name


@pytest.mark.parametrize(
    "table",
    ["MERGERS", "SERVER_OPTIMIZERS", "METHODS", "TASKS"],
)
def test_every_registry_string_names_a_class_registered_under_its_name(table):
    from fedsim.config import registry

    for name, ref in getattr(registry, table).items():
        cls = registry.load(ref)
        assert isinstance(cls, type), ref
        if table != "TASKS":
            assert cls.name == name, (table, name, cls)


def test_backbone_builders_and_dataset_loaders_resolve():
    from fedsim.config.registry import BACKBONES, DATASETS

    for spec in BACKBONES.values():
        assert callable(spec.load_builder())
    for spec in DATASETS.values():
        if spec.needs_root:
            assert callable(spec.load("loader")) and callable(spec.load("file_of"))


def test_objectives_are_exactly_the_methods_flagged_objective():
    from fedsim.config.registry import OBJECTIVES, method_classes

    flagged = {cls.name for cls in method_classes() if cls.objective}
    assert set(OBJECTIVES) == {"plain"} | flagged


def test_sharing_policies_agree_with_the_rules_that_implement_them():
    from aggregation.registry import SHARING_POLICIES
    from aggregation.sharing import _SHARED

    assert tuple(_SHARED) == SHARING_POLICIES


def test_hooks_run_in_the_declared_order():
    from fedsim.config.registry import method_classes

    orders = [cls.order for cls in method_classes()]
    assert orders == sorted(orders)
    assert all(order > 0 for order in orders), "every method declares its order"


def test_each_hook_set_names_only_hooks_the_base_defines():
    from fedsim.config.registry import method_classes
    from fedsim.methods.base import ClientHooks, Method, RunHooks, ServerHooks

    sets = [
        {n for n in vars(h) if not n.startswith("__") and n != "server"}
        for h in (ClientHooks, ServerHooks, RunHooks)
    ]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    hooks = set().union(*sets)
    for cls in method_classes():
        own = {n for n in vars(cls) if callable(getattr(cls, n)) and not n.startswith("_")}
        unknown = own - hooks - set(vars(Method)) - {"enabled", "check", "dp_conflict"}
        # a method may keep helpers of its own, but never a misspelt hook: flag any public
        # callable that looks like one
        assert not {n for n in unknown if n.startswith(("before_", "after_", "on_"))}, (
            cls,
            unknown,
        )


# Modules that share a name on purpose: a rule's math in aggregation/ and the method that plugs
# it into a run in fedsim/methods/ (the same concept in two layers), the two plug-in registries,
# and LoRA scaling (the math, and a client's scaling from the config).
SAME_CONCEPT = {
    "editing",
    "fedex",
    "fedplora",
    "fednova",
    "flora",
    "privacy",
    "robust",
    "scaffold",
    "sharing",
    "registry",
    "scaling",
}


def test_no_two_modules_share_a_name_with_different_meanings():
    seen: dict[str, list[str]] = defaultdict(list)
    for name in MODULES:
        stem = name.rpartition(".")[2]
        if MODULES[name].name != "__init__.py":
            seen[stem].append(name)
    shared = {stem: mods for stem, mods in seen.items() if len(mods) > 1}
    assert set(shared) <= SAME_CONCEPT, {s: m for s, m in shared.items() if s not in SAME_CONCEPT}
