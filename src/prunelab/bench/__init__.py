"""Standardised benchmarks: sweep specs, executors, the SQLite results store, reports."""

from prunelab.bench.spec import Grid, RunSpec, SweepSpec, Targets
from prunelab.bench.store import ResultStore
from prunelab.bench.sweep import SweepSummary, run_sweep

__all__ = ["Grid", "ResultStore", "RunSpec", "SweepSpec", "SweepSummary", "Targets", "run_sweep"]
