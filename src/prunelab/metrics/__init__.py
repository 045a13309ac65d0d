"""Metrics: parameter counts, FLOPs, latency, accuracy."""

from prunelab.metrics.accuracy import evaluate
from prunelab.metrics.counting import count_parameters
from prunelab.metrics.flops import FlopCount, count_flops, flops_per_module
from prunelab.metrics.latency import Latency, measure_latency
from prunelab.metrics.measure import LayerStats, Measurement, measure

__all__ = [
    "FlopCount",
    "Latency",
    "LayerStats",
    "Measurement",
    "count_flops",
    "count_parameters",
    "evaluate",
    "flops_per_module",
    "measure",
    "measure_latency",
]
