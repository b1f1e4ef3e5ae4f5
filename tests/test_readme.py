"""Every ```python block of the README runs as a test, or is marked as a fragment.

The convention: the line just before each block is an HTML comment (invisible on
GitHub) that says which, and why for a fragment::

    <!-- readme: tested by tests/test_readme.py::test_quickstart_runs -->
    <!-- readme: fragment: needs an app of yours (names like engine and url) -->

``test_every_python_block_is_tested_or_a_fragment`` fails for a block with neither, or
naming a test that does not exist; the tests below find their block by that mark.
"""

from __future__ import annotations

import re
import runpy
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_MARK = re.compile(r"<!-- readme: (?:tested by (?P<test>\S+)|fragment: (?P<reason>.*\S)) -->")


@dataclass(frozen=True, slots=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    mark: str  # the comment line before the block, "" when there is none

    @property
    def tested_by(self) -> str | None:
        found = _MARK.fullmatch(self.mark)
        return found["test"] if found else None


def python_blocks() -> list[Block]:
    text = README.read_text()
    blocks = []
    for found in _BLOCK.finditer(text):
        before = text[: found.start()].rstrip("\n").rpartition("\n")[2]
        line = text.count("\n", 0, found.start()) + 1
        blocks.append(Block(line=line, code=found[1], mark=before.strip()))
    return blocks


def block_tested_by(test: str) -> str:
    """The one README block marked as tested by ``test`` (a ``path::name`` id)."""
    [code] = [block.code for block in python_blocks() if block.tested_by == test]
    return code


def _test_exists(test_id: str) -> bool:
    path, _, name = test_id.partition("::")
    source = ROOT / path
    defined = re.compile(rf"^(async )?def {re.escape(name)}\(", re.MULTILINE)
    return source.is_file() and defined.search(source.read_text()) is not None


def test_every_python_block_is_tested_or_a_fragment() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 10  # the regex still finds them

    unmarked = [block.line for block in blocks if not _MARK.fullmatch(block.mark)]
    missing = [
        f"line {block.line}: {block.tested_by}"
        for block in blocks
        if block.tested_by is not None and not _test_exists(block.tested_by)
    ]
    assert unmarked == [], "README python blocks with no <!-- readme: ... --> mark, by line"
    assert missing == [], "README blocks marked as tested by a test that does not exist"


def run_block(test: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """Run the README block ``test`` tests as a script in ``directory`` (warnings are errors)."""
    script = directory / "readme_block.py"
    script.write_text(block_tested_by(test))
    return subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_quickstart_runs(tmp_path: Path) -> None:
    result = run_block("tests/test_readme.py::test_quickstart_runs", tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['ada']"
    with sqlite3.connect(tmp_path / "quickstart.db") as connection:
        rows = connection.execute("SELECT name FROM quickstart_user ORDER BY id").fetchall()
    assert rows == [("ada",), ("grace",)]


async def test_fastapi_snippet_commits_before_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "snippet.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{database}")
    script = tmp_path / "snippet.py"
    script.write_text(
        block_tested_by("tests/test_readme.py::test_fastapi_snippet_commits_before_it_answers")
    )
    snippet = runpy.run_path(str(script))
    db = snippet["db"]
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(snippet["Base"].metadata.create_all)
        transport = httpx.ASGITransport(app=snippet["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/items", json={"name": "ada"})
    finally:
        await db.dispose()

    assert response.status_code == 201, response.text
    assert response.json() == {"id": 1, "name": "ada"}
    with sqlite3.connect(database) as connection:  # committed, seen from outside
        assert connection.execute("SELECT id, name FROM items").fetchall() == [(1, "ada")]
