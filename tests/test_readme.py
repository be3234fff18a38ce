"""The README's API tour runs as written (embedded devices) and prints eager torch results."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tour_source() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md lost its ```python API tour block"
    return blocks[0]


def test_the_readme_opens_with_exactly_the_demo_and_test_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, flags=re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert [c for c in commands if c] == ["./scripts/demo", "./scripts/test"]


def test_the_api_tour_runs_and_prints_what_eager_torch_computes(tmp_path: Path) -> None:
    script = tmp_path / "tour.py"
    script.write_text(tour_source())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        names = runpy.run_path(str(script), run_name="__main__")
    printed = out.getvalue()
    x = torch.tensor([-1.0, 2.0])
    assert str(torch.abs(x + x)) in printed
    net = names["net"]
    with torch.no_grad():
        eager = torch.log_softmax(net.fc1(torch.ones(4, 2)), dim=-1)
    assert str(eager).removesuffix(")") in printed
    assert printed.count("tensor(") == 2
