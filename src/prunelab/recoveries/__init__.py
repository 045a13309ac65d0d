"""After pruning: registered recoveries (fine-tune, rewind, Scratch-E/B, none) and the
lottery-ticket building blocks (:class:`Snapshot`, :func:`rewind_weights`).

Every module of this package is imported here, so a new recovery file is picked up by configs,
sweeps, the CLI and the docs without edits elsewhere.
"""

import importlib
import pkgutil

from prunelab.recoveries.base import RECOVERIES, Recovery

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from prunelab.recoveries.rewind import Snapshot, rewind_weights  # noqa: E402

__all__ = ["RECOVERIES", "Recovery", "Snapshot", "rewind_weights"]
