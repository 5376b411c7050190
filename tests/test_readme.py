"""The README stays true: its supported-patterns table is the one the code generates, its tour
runs as written, and its CLI sample is what the CLI prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moefuse.cli import main
from moefuse.patterns import supported_table

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_readme_patterns_table_matches_the_code():
    text = README.read_text()
    start = text.index("<!-- patterns-table:start -->") + len("<!-- patterns-table:start -->")
    end = text.index("<!-- patterns-table:end -->")
    assert text[start:end].strip() == supported_table().strip()


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    head = text[: text.index("## ")]
    blocks = head.split("```bash")[1:]
    assert len(blocks) == 2
    assert "examples/demo.py" in blocks[0] and "pytest" in blocks[1]


def test_readme_tour_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", _section("A tour"), re.S)
    namespace: dict = {}
    exec(compile(code, "README.md: A tour", "exec"), namespace)
    assert [site.op for site in namespace["plan"].fused] == ["route", "moe"]
    assert "2 fused, 0 declined" in capsys.readouterr().out


def test_readme_cli_output_is_the_real_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = README.read_text()
    block = text[text.index("<!-- cli-output -->") : text.index("<!-- /cli-output -->")]
    (sample,) = re.findall(r"```text\n(.*?)```", block, re.S)
    command, _, shown = sample.partition("\n")
    assert command == "$ moefuse explain examples/demo.py:target"
    monkeypatch.chdir(README.parent)  # locations print relative to the current folder
    assert main(["explain", "examples/demo.py:target"]) == 0
    assert shown == capsys.readouterr().out
