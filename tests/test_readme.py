"""The README's Python examples run as written.

Each ```python block of README.md runs in its own interpreter, in a scratch folder that holds
a copy of engine/samples, so the block's relative paths mean what they mean in the repository
root and its outputs land in the scratch folder. A block whose first line is a comment
starting with ``# needs `` (``# needs Ray (pip install ...)``) is skipped with that line as the
reason: it needs something a test machine may lack (Ray, a GPU).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
NEEDS = "# needs "


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


BLOCKS = python_blocks((ROOT / "README.md").read_text())


def test_the_readme_has_python_blocks_to_run():
    assert any(not b.startswith(NEEDS) for b in BLOCKS)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code, tmp_path):
    first = code.splitlines()[0] if code else ""
    if first.startswith(NEEDS):
        pytest.skip(f"README block marked '{first[2:]}'")
    shutil.copytree(ROOT / "engine" / "samples", tmp_path / "engine" / "samples")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"README block failed:\n{code}\n{res.stderr[-3000:]}"
