"""The documentation site builds strictly and its code examples run."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "docs" / "index.md", *sorted((ROOT / "docs" / "tutorials").glob("*.md"))]


def python_blocks(page: Path) -> str:
    """The page's ```python blocks, in order, as one program (later blocks build on earlier)."""
    return "\n".join(re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_code_example_of_the_docs_runs(page, tmp_path, monkeypatch, shared_data) -> None:
    code = python_blocks(page)
    assert code.strip(), f"{page.name} has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_in_strict_mode(tmp_path) -> None:
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                            "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
