"""When to prune: registered schedules (one-shot, iterative, gradual, ...) and their building
blocks (:class:`Pruner`, :func:`one_shot`, :func:`iterative`, :class:`GradualPruning`).

Every module of this package is imported here, so a new schedule file is picked up by configs,
sweeps, the CLI and the docs without edits elsewhere.
"""

import importlib
import pkgutil

from prunelab.schedules.base import SCHEDULES, Pruner, Recover, Schedule

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from prunelab.schedules.gradual import GradualPruning, agp_sparsity  # noqa: E402
from prunelab.schedules.iterative import iterative, iterative_sparsities  # noqa: E402
from prunelab.schedules.one_shot import one_shot  # noqa: E402

__all__ = [
    "SCHEDULES",
    "GradualPruning",
    "Pruner",
    "Recover",
    "Schedule",
    "agp_sparsity",
    "iterative",
    "iterative_sparsities",
    "one_shot",
]
