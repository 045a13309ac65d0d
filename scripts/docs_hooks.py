"""mkdocs hooks (``hooks:`` in mkdocs.yml): the site's page per pruning method, generated from the
method registry at build time, and listed in the navigation under the one-page reference."""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

from prunelab.reference import method_pages

#: The nav entry (in mkdocs.yml) that the per-method pages join.
REFERENCE = "methods.md"


def on_config(config: Any) -> Any:
    pages = [{path.removeprefix("methods/").removesuffix(".md"): path}
             for path in method_pages()]
    for index, entry in enumerate(config["nav"]):
        (title, target), = entry.items()
        if target == REFERENCE:
            config["nav"][index] = {title: [{"All on one page": REFERENCE}, *pages]}
            return config
    raise ValueError(f"mkdocs.yml's nav has no entry for {REFERENCE}")


def on_files(files: Files, config: Any) -> Files:
    for path, text in method_pages().items():
        files.append(File.generated(config, path, content=text))
    return files
