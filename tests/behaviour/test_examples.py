"""The ported seed tutorials in examples/ run and print what the seeds show."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

EXPECTED = {
    "01_plans_intro": ["tensor([2., 4.])", "[PointerPlan | me:", "Tags: input_data"],
    "02_plans_tutorial": [
        "A plan needs to be built before being sent to a worker.",
        "tensor([2., 4.])",
        "tensor([2, 1])",
    ],
    "03_plans_notes": ["{'run_plan': 5}", "tensor([2, 1])"],
    "07_plans_usage": ["tensor([3., 3., 3., 3., 3.])"],
    "04_remote_tensors": ["tensor([6, 6, 6, 6, 6])", "alice: []", "tensor([1, 2, 3, 4])"],
    "05_federated_training": ["Bob:tensor(", " Alice:tensor(", "final predictions:"],
    "06_federated_digits": ["Train Epoch: 1 [0/", "Test set: Average loss:"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_example_prints_what_its_seed_shows(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    out = capsys.readouterr().out
    for line in EXPECTED[name]:
        assert line in out


def test_every_example_is_run_here_and_listed_in_reading_order_in_the_readme() -> None:
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(EXPECTED)
    assert [int(name[:2]) for name in scripts] == list(range(1, len(scripts) + 1))
    listed = [
        line.split("`")[1].removesuffix(".py")
        for line in (EXAMPLES / "README.md").read_text().splitlines()
        if line.startswith("- `")
    ]
    assert listed == scripts
