"""Structured pruning: channel groups on torch-pruning's dependency graph, physical removal."""

from prunelab.structured.graph import (
    ChannelGroup,
    Graph,
    apply_plan,
    replay_structure,
    structure_of,
)
from prunelab.structured.method import StructuredMethod

__all__ = ["ChannelGroup", "Graph", "StructuredMethod", "apply_plan", "replay_structure",
           "structure_of"]
