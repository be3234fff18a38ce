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
