"""The package's import graph (every import, function-local ones included) has no cycles, and the layers
below training never import it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "revgan_med"
# modules that must work without the training code (a model is used, not trained, there); a prefix
# covers a package's modules and, for inference, every ``revgan_med.inference*`` module
BELOW_TRAINING = ("revgan_med.inference", "revgan_med.networks", "revgan_med.data", "revgan_med.io")
# the layers, top to bottom (README "Architecture"): a module may import its own layer and those below
LAYERS = (
    ("revgan_med.cli", "revgan_med.__main__"),
    ("revgan_med.api", "revgan_med.demo", "revgan_med.sensitivity", "revgan_med.benchmarks",
     "revgan_med.export", "revgan_med.bundle"),
    ("revgan_med.training",),
    ("revgan_med.evaluation", "revgan_med.figures", "revgan_med.inference_files", "revgan_med.errormap"),
    ("revgan_med.inference",),
    ("revgan_med.checkpoints",),
    ("revgan_med.networks", "revgan_med.data"),
    ("revgan_med.config",),
    ("revgan_med.io",),
    ("revgan_med.tasks", "revgan_med.registry", "revgan_med.sharding", "revgan_med.runtime",
     "revgan_med.tiling"),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The package module `name` refers to (a name imported from a module maps to that module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (``revgan_med`` itself, the version only, is left out)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets.update(t for n in names if (t := _resolve(n, modules)) not in (None, name, "revgan_med"))
        graph[name] = targets
    return graph


def layer_of(module: str) -> int | None:
    """Index in `LAYERS` of the longest name that is `module` or a package above it."""
    matches = [
        (len(name), index)
        for index, names in enumerate(LAYERS)
        for name in names
        if module == name or module.startswith(name + ".")
    ]
    return max(matches)[1] if matches else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_known_cycle_and_accepts_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_resolves_names_imported_from_modules() -> None:
    graph = import_graph()
    assert "revgan_med.networks.coupling" in graph["revgan_med.networks.generators"]
    assert "revgan_med.config" in graph["revgan_med.training.loop"]
    assert "revgan_med.inference" in graph["revgan_med.inference_files"]
    # longest match: inference_files is its own entry, not the inference layer's
    files, arrays = layer_of("revgan_med.inference_files"), layer_of("revgan_med.inference")
    assert files < arrays < layer_of("revgan_med.io")
    assert layer_of("revgan_med.training.objectives.base") == layer_of("revgan_med.training")


def test_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("layer", BELOW_TRAINING)
def test_layer_does_not_import_training(layer: str) -> None:
    graph = import_graph()
    offending = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith(layer)
        for target in targets
        if target.startswith("revgan_med.training")
    )
    assert not offending, "; ".join(offending)


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones() -> None:
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "revgan_med" and layer_of(m) is None)
    assert not unplaced, f"modules without a layer in LAYERS: {unplaced}"
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if module != "revgan_med" and layer_of(target) < layer_of(module)
    )
    assert not upward, "imports of a higher layer: " + "; ".join(upward)

