"""Code standards as tests: ruff and mypy clean, and the design's structural rules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("producer", "consumer", "schemas", "broker_config")
MAX_MODULE_LINES = 600
PIKA_MODULES = {"producer/transport/amqp.py"}
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle"}


def package_modules() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if not path.name.endswith("_pb2.py")
    )


def imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_finds_nothing() -> None:
    result = run_tool("ruff", "check", ".", "--output-format", "concise")
    assert result.returncode == 0, f"ruff check . failed:\n{result.stdout}{result.stderr}"


def test_mypy_finds_nothing() -> None:
    result = run_tool("mypy")
    assert result.returncode == 0, f"mypy (config in pyproject.toml) failed:\n{result.stdout}"


def test_there_are_modules_to_check() -> None:
    assert len(package_modules()) > 10


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_has_a_docstring_and_stays_small(path: Path) -> None:
    source = path.read_text()
    tree = ast.parse(source)
    if source.strip():  # empty __init__.py files are fine
        assert ast.get_docstring(tree), f"{path.relative_to(ROOT)}: add a one-line docstring"
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, (
        f"{path.relative_to(ROOT)} has {lines} lines; split it along a seam "
        f"(one concept per module, ~400 lines)"
    )


def test_only_the_amqp_transport_imports_pika() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in package_modules()
        if "pika" in imported_modules(ast.parse(path.read_text()))
        and str(path.relative_to(ROOT)) not in PIKA_MODULES
    ]
    assert not offenders, f"only {PIKA_MODULES} may import pika; found it in {offenders}"


def test_nothing_unpickles_or_evaluates() -> None:
    offenders: list[str] = []
    for path in package_modules():
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(ROOT))
        for name in imported_modules(tree) & FORBIDDEN_IMPORTS:
            offenders.append(f"{rel} imports {name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("eval", "exec")
            ):
                offenders.append(f"{rel}:{node.lineno} calls {node.func.id}()")
    assert not offenders, "plans are data: nothing is unpickled or evaluated:\n" + "\n".join(
        offenders
    )


SCRIPTS = [
    "scripts/bootstrap",
    "scripts/test",
    "scripts/demo",
    "scripts/ensure_rabbitmq",
    "scripts/gen_protos",
    ".ci/run",
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_script_is_executable_bash_that_parses(name: str) -> None:
    path = ROOT / name
    assert path.is_file(), f"{name} is missing"
    assert path.stat().st_mode & 0o111, f"{name} is not executable: chmod +x {name}"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{name} has a bash syntax error:\n{result.stderr}"


# -- import direction -------------------------------------------------------------------------

LAYERS: dict[str, float] = {
    "schemas": 0,
    "broker_config": 1,
    "consumer": 2,
    "producer.transport": 3,
    "producer.plans": 3,
    # handles on devices in one direction: fleet -> device -> pointers -> ops
    "producer.remote.ops": 4.1,
    "producer.remote.collector": 4.1,
    "producer.remote.tagging": 4.1,
    "producer.remote.pointers": 4.2,
    "producer.remote.device": 4.3,
    "producer.remote.fleet": 4.4,
    "producer.remote": 4.5,
    "producer.compat": 5,
    "producer.fl": 6,
    "producer.cli": 7,
    "producer": 8,  # the package itself: the public API `import producer as fp`
}
"""A module may import its own group or lower ranks only (same rank, other group: no)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The longest ``LAYERS`` key that ``module`` is or is inside of."""
    return max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every import ``path`` runs, at module level or inside a function.

    ``if TYPE_CHECKING:`` blocks do not run. ``from pkg import name`` counts as an import of
    ``pkg.name`` when that is a module of ours, else of ``pkg``.
    """
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return [(line, name) for line, name in found if name in modules]


def import_graph() -> dict[str, list[tuple[int, str]]]:
    paths = {module_name(p): p for p in package_modules()}
    modules = set(paths)
    return {name: runtime_imports(path, modules) for name, path in paths.items()}


def test_the_import_graph_is_read_from_the_source() -> None:
    graph = import_graph()
    assert "producer.remote.fleet" in {m for _, m in graph["producer"]}
    assert "schemas.errors" in {m for _, m in graph["producer.remote.collector"]}
    assert "producer.transport.amqp" in {m for _, m in graph["producer.remote.fleet"]}  # in a def


def test_imports_follow_the_layers_schemas_broker_config_consumer_producer() -> None:
    offenders = []
    for module, imports in import_graph().items():
        mine = layer_of(module)
        for line, target in imports:
            theirs = layer_of(target)
            if theirs == mine or LAYERS[theirs] < LAYERS[mine]:
                continue
            offenders.append(f"{module}:{line} imports {target} ({mine} may not use {theirs})")
    assert not offenders, "imports against the layers " + repr(LAYERS) + ":\n" + "\n".join(
        offenders
    )


def find_cycle(graph: dict[str, list[tuple[int, str]]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``) in ``graph``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for _, target in graph.get(node, []):
            if target == node:
                continue
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import() -> None:
    graph = {"a": [(1, "b")], "b": [(1, "c")], "c": [(9, "a")], "d": [(1, "a")]}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": [(1, "b")], "b": []}) is None


def test_no_module_imports_itself_back_through_others() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle (module-level or in a def): " + " -> ".join(cycle or [])
