"""docs/methods.md: every registered method, schedule and recovery, generated from the
registries and docstrings (``prunelab methods --markdown``), so the docs cannot drift."""

from __future__ import annotations

from prunelab.methods import methods_markdown
from prunelab.recoveries import RECOVERIES
from prunelab.schedules import SCHEDULES
from prunelab.strategies import strategies_markdown

STRATEGIES = (("Schedules (when to prune)", SCHEDULES),
              ("Recoveries (after pruning)", RECOVERIES))


def reference_markdown() -> str:
    """The methods reference followed by the schedules and recoveries."""
    sections = [methods_markdown()]
    sections += ["\n".join(strategies_markdown(title, registry))
                 for title, registry in STRATEGIES]
    return "\n".join(sections)
