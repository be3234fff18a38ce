"""The checked-in schemas/*_pb2.py(i) match what the .proto files generate today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "schemas").glob("*.proto"))


def generate(out: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={out}",
            f"--mypy_out={out}",
            *(str(p.relative_to(ROOT)) for p in PROTOS),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"


def test_there_are_proto_files_to_check() -> None:
    assert {p.name for p in PROTOS} >= {"tensor.proto", "plan.proto", "command.proto"}


def test_the_checked_in_generated_code_is_up_to_date(tmp_path: Path) -> None:
    generate(tmp_path)
    generated = sorted(
        p.relative_to(tmp_path) for p in (tmp_path / "schemas").iterdir() if "_pb2" in p.name
    )
    checked_in = sorted(
        p.relative_to(ROOT) for p in (ROOT / "schemas").iterdir() if "_pb2." in p.name
    )
    assert generated == checked_in, (
        "generated files differ from the checked-in set; run ./scripts/gen_protos and commit"
    )
    stale = [
        str(rel) for rel in generated if (tmp_path / rel).read_bytes() != (ROOT / rel).read_bytes()
    ]
    if stale:
        pytest.fail(
            f"stale generated code: {', '.join(stale)}; run ./scripts/gen_protos and commit "
            "the regenerated schemas/*_pb2.py and *_pb2.pyi"
        )
