"""The README stays true: its supported-patterns table is the one the code generates."""

from __future__ import annotations

from pathlib import Path

from moefuse.patterns import supported_table

README = Path(__file__).resolve().parent.parent / "README.md"


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
