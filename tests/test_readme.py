"""The README's Python blocks run as written (from the repository root, as a reader would)."""

from __future__ import annotations

import os
import re

import pytest

from conftest import REPO_ROOT, SHARED


def _python_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_blocks():
    assert len(_python_blocks()) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, monkeypatch):
    block = _python_blocks()[index]
    if "../shared" in block and not (SHARED / "conformance").exists():
        pytest.skip("../shared is not present")
    monkeypatch.chdir(REPO_ROOT)
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "readme"})
    assert os.getcwd() == str(REPO_ROOT)
