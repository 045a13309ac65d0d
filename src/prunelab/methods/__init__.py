"""Pruning methods, one file each, registered by name in :data:`METHODS`.

Every module in this package is imported here, so a new method file is picked up by the API, the
CLI, the benchmark and the docs without edits elsewhere.
"""

import importlib
import pkgutil

from prunelab.methods.base import (
    METHODS,
    LayerSelection,
    Method,
    UnstructuredMethod,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "LayerSelection", "Method", "UnstructuredMethod", "register_method"]
