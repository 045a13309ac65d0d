"""Reference weights shipped with prunelab: converged dense models to prune.

A pruning benchmark says little when it starts from an unconverged model, so the repository
ships small reference models trained by ``scripts/train_reference.py`` on prunelab's own data
pipeline (validation carved from the training data, the epoch kept by validation accuracy, test
accuracy measured once). ``weights/manifest.json`` lists each file with its SHA-256, the data it
was trained on and how; :func:`load_pretrained` refuses a file whose digest differs. The files
are plain state dicts read with ``torch.load(weights_only=True)``, so loading runs no pickled
code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import InvalidValueError, PrunelabError

WEIGHTS = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS / "manifest.json"


def available() -> dict[str, dict[str, Any]]:
    """The manifest: ``"<model>/<dataset>"`` -> what is known about those weights."""
    if not MANIFEST.is_file():
        return {}
    return json.loads(MANIFEST.read_text())


def entry(model: str, dataset: str) -> dict[str, Any]:
    """The manifest entry of ``model`` trained on ``dataset``, or a clear error listing what is
    shipped."""
    entries = available()
    key = f"{model}/{dataset}"
    if key not in entries:
        shipped = ", ".join(f"{k.split('/')[0]} (pretrained={k.split('/')[1]!r})"
                            for k in sorted(entries)) or "none"
        raise InvalidValueError(f"no pretrained weights for {model!r} on {dataset!r}; shipped: "
                                f"{shipped}")
    return entries[key]


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pretrained(model: nn.Module, name: str, dataset: str) -> nn.Module:
    """Load the shipped weights of ``name`` trained on ``dataset`` into ``model`` (in place),
    after checking the file's SHA-256 against the manifest."""
    info = entry(name, dataset)
    path = WEIGHTS / info["file"]
    if not path.is_file():
        raise PrunelabError(f"pretrained weights {str(path)!r} are missing from this install")
    if sha256(path) != info["sha256"]:
        raise PrunelabError(f"pretrained weights {str(path)!r} are corrupted (SHA-256 differs "
                            "from the manifest); reinstall prunelab")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def add_weights(model: nn.Module, name: str, dataset: str, info: dict[str, Any]) -> Path:
    """Save ``model``'s weights as the reference of ``name`` on ``dataset`` and record them (with
    ``info``: accuracy, recipe, provenance) in the manifest. Used by scripts/train_reference.py."""
    from prunelab.utils import write_atomically

    WEIGHTS.mkdir(exist_ok=True)
    path = WEIGHTS / f"{name}-{dataset}.pt"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, lambda f: torch.save(state, f))
    entries = available()
    entries[f"{name}/{dataset}"] = {"file": path.name, "sha256": sha256(path), **info}
    text = json.dumps(dict(sorted(entries.items())), indent=2) + "\n"
    write_atomically(MANIFEST, text)
    return path
