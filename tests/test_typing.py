"""mypy --strict checks the generic factories and the typed option list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

HERE = Path(__file__).parent / "typing"


def run_mypy(path: Path) -> tuple[str, int]:
    stdout, stderr, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir=/dev/null", "--no-error-summary", str(path)]
    )
    return stdout + stderr, status


def test_generic_session_types_are_inferred() -> None:
    output, status = run_mypy(HERE / "check_generics.py")
    assert status == 0, output


def test_bad_options_are_type_errors() -> None:
    output, _status = run_mypy(HERE / "check_errors.py")
    expected = [
        line_no
        for line_no, line in enumerate((HERE / "check_errors.py").read_text().splitlines(), 1)
        if "# E:" in line
    ]
    flagged = sorted({int(m) for m in re.findall(r"check_errors\.py:(\d+): error", output)})
    assert flagged == expected, output
