"""The documentation site builds strictly and its code examples run."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
#: Every page with a python example: README and the site.
PAGES = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").rglob("*.md"))
                               if "```python" in p.read_text())]
# A block that cannot run in a test (a long training, a GPU, a cluster) says so on the line before
# its fence, with the reason visible to readers: <!-- not-run: trains ResNet-56 for hours -->
NOT_RUN = re.compile(r"<!-- not-run: \S[^>]*-->\n$")


def python_blocks(page: Path) -> str:
    """The page's ```python blocks, in order, as one program (later blocks build on earlier),
    leaving out those marked not-run."""
    text = page.read_text()
    blocks = re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)
    return "\n".join(b.group(1) for b in blocks if not NOT_RUN.search(text[:b.start()]))


def cli_commands(page: Path) -> list[list[str]]:
    """The `prunelab <command> [<subcommand>]` words of the page's ```bash blocks."""
    commands = set()
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
        for words in re.findall(r"^prunelab ((?:[a-z][a-z0-9-]* ?){1,2})", block, re.M):
            commands.add(tuple(words.split()))
    return [list(c) for c in sorted(commands)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_code_example_of_the_docs_runs(page, tmp_path, monkeypatch, shared_data) -> None:
    code = python_blocks(page)
    assert code.strip(), f"{page.name} has no python example"
    monkeypatch.chdir(tmp_path)
    # Methods a page registers are gone afterwards (other tests list the registry).
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    # dont_inherit: the page runs as a user would, without this file's __future__ imports
    exec(compile(code, str(page), "exec", dont_inherit=True), {"__name__": "__docs__"})


def test_the_not_run_marker_needs_a_reason(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n<!-- not-run: needs a GPU -->\n```python\ny = 1\n```\n"
                    "<!-- not-run: -->\n```python\nz = 1\n```\n")
    assert python_blocks(page) == "x = 1\n\nz = 1\n"


@pytest.mark.parametrize("page", [ROOT / "README.md"], ids=["README.md"])
def test_every_command_the_readme_names_exists(page) -> None:
    from typer.testing import CliRunner

    from prunelab.cli import app

    commands = cli_commands(page)
    assert ["run"] in [c[:1] for c in commands], "the README shows no `prunelab run`"
    for words in commands:
        # The second word is a subcommand or an argument (a model name, a file): --help settles it.
        result = CliRunner().invoke(app, [*words[:1], "--help"])
        assert result.exit_code == 0, f"prunelab {words[0]}: {result.output}"
        if len(words) == 2 and "Commands" in result.output:
            sub = CliRunner().invoke(app, [*words, "--help"])
            assert sub.exit_code == 0, f"prunelab {' '.join(words)}: {sub.output}"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_in_strict_mode(tmp_path) -> None:
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                            "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    from prunelab.methods import METHODS

    for name in METHODS:  # a page per method, generated from the registry (scripts/docs_hooks.py)
        page = (tmp_path / "site" / "methods" / name / "index.html").read_text()
        assert f"<code>{name}</code>" in page and "How it decides" in page
    sparsegpt = (tmp_path / "site" / "methods" / "sparsegpt" / "index.html").read_text()
    assert "layerwise solver" in sparsegpt and "<code>input_blocks</code>" in sparsegpt


def test_every_method_pages_example_call_runs() -> None:
    """The call each generated method page shows works as written (merge, which only folds
    neurons read by a Linear layer, on an MLP)."""
    import re
    import warnings

    import torch

    import prunelab
    from prunelab.reference import method_pages

    images = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    digits = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    calls = 0
    for path, text in method_pages().items():
        call = re.search(r"prunelab\.prune\(model, (.*)\)\n", text)
        if call is None:
            assert "runs through the harness" in text, path
            continue
        mlp = "merge" in path
        model = prunelab.models.create("lenet-300-100", input_shape=(1, 8, 8)) if mlp else \
            prunelab.models.create("resnet20", width=0.5, input_shape=(3, 16, 16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eval(f"prunelab.prune(model, {call.group(1)})",
                 {"prunelab": prunelab, "model": model, "batches": digits if mlp else images})
        calls += 1
    assert calls >= 15
