"""What produced a result: versions, git commit, host, time, and a stable config hash."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import torch


def config_hash(config: Any) -> str:
    """Short SHA-256 of the canonical JSON of ``config`` (dict or pydantic model)."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@cache
def git_commit() -> str | None:
    """Commit of the prunelab source tree (with ``-dirty`` if it has changes), if in git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def environment() -> dict[str, Any]:
    """Versions, commit, host and time, recorded with every result."""
    import numpy
    import torchvision

    from prunelab import __version__

    return {
        "prunelab": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
