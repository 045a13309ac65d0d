"""Sweep specifications: an experiment plus a grid of methods × targets × seeds × recoveries.

Every run of the grid has a key: the hash of everything that determines its result. The store
keeps one row per key, which is what makes a sweep resumable and duplicate-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from prunelab.config import CheckedModel
from prunelab.experiment_config import (
    ExperimentConfig,
    MethodChoice,
    RecoveryConfig,
    training_variant,
)
from prunelab.methods import METHODS
from prunelab.provenance import config_hash
from prunelab.recoveries import RECOVERIES, Recovery
from prunelab.sparsity import check_sparsity

TargetKind = Literal["sparsity", "compression", "speedup", "latency_speedup"]
RATIO_KINDS = ("compression", "speedup", "latency_speedup")

#: The controls of each granularity: random pruning and magnitude pruning of the same structure.
CONTROLS: dict[str, tuple[str, ...]] = {
    "unstructured": ("random", "magnitude"),
    "channel": ("random-channel", "l2-channel"),
}


class Targets(CheckedModel):
    """Pruning targets; give one or more kinds. ``speedup`` is a theoretical FLOPs reduction;
    ``latency_speedup`` (channel methods) a speed-up predicted from layer latencies measured
    with torch at the latency batch size (``prunelab.prune``'s ``latency_speedup``)."""

    model_config = ConfigDict(extra="forbid")
    sparsity: list[float] = Field(default_factory=list)
    compression: list[float] = Field(default_factory=list)
    speedup: list[float] = Field(default_factory=list)
    latency_speedup: list[float] = Field(default_factory=list)

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, value: list[float]) -> list[float]:
        return [check_sparsity(v) for v in value]

    @field_validator(*RATIO_KINDS)
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if any(not 1 <= v < math.inf for v in value):
            raise ValueError(f"compression and speed-up targets are finite ratios >= 1, got "
                             f"{value}")
        return value

    @model_validator(mode="after")
    def _some(self) -> Targets:
        if not any(getattr(self, kind) for kind in ("sparsity", *RATIO_KINDS)):
            raise ValueError("give at least one target (sparsity, compression, speedup or "
                             "latency_speedup)")
        return self

    def pairs(self) -> list[tuple[str, float]]:
        return [(kind, v) for kind in ("sparsity", *RATIO_KINDS) for v in getattr(self, kind)]


class GridMethod(MethodChoice):
    """A method of a grid. ``recoveries``, when given, replace the grid's for this method
    alone, so e.g. a static baseline and dynamic sparse training share one sweep without
    running every pairing."""

    recoveries: list[RecoveryConfig] | None = None

    @field_validator("recoveries")
    @classmethod
    def _some_recovery(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("must not be empty (leave it out to use the grid's recoveries)")
        return value

    def choice(self) -> MethodChoice:
        """The method itself, without its recoveries (what a run and its key hold)."""
        return MethodChoice.model_validate(self.model_dump(exclude={"recoveries"}))


class Grid(CheckedModel):
    """What a sweep varies."""

    model_config = ConfigDict(extra="forbid")
    methods: list[GridMethod]
    targets: Targets
    seeds: list[int] = Field(default_factory=lambda: [0])
    recoveries: list[RecoveryConfig] | None = None
    controls: bool = Field(True, description="add random and magnitude pruning of each "
                                             "granularity, and Scratch-B for channel methods")

    def choices(self) -> list[MethodChoice]:
        """The methods to run: the grid's, then (unless ``controls`` is off) the controls of
        every granularity they use that are not already listed, with the scope of the first
        method of that granularity."""
        from prunelab.methods import METHODS

        choices = [m.choice() for m in self.methods]
        if not self.controls:
            return choices
        listed = {c.method for c in choices}
        for choice in self.methods:
            granularity = METHODS.get(choice.method).granularity
            for control in CONTROLS.get(granularity, ()):
                if control not in listed:
                    listed.add(control)
                    choices.append(MethodChoice(method=control, scope=choice.scope))
        return choices

    def own_recoveries(self, choice: MethodChoice) -> list[RecoveryConfig] | None:
        """The recoveries listed with ``choice`` in ``methods``, or None (the grid's)."""
        return next((m.recoveries for m in self.methods if m.name == choice.name), None)

    @model_validator(mode="after")
    def _latency_needs_channels(self) -> Grid:
        """A latency target removes channels: refuse a method that does not, before training."""
        from prunelab.methods import METHODS
        from prunelab.structured.method import StructuredMethod

        if self.targets.latency_speedup:
            others = [c.method for c in self.methods
                      if not issubclass(METHODS.get(c.method), StructuredMethod)]
            if others:
                raise ValueError(f"latency_speedup targets need channel methods; "
                                 f"{', '.join(others)} remove{'s' if len(others) == 1 else ''} "
                                 "no channels (give them their own sweep, or a speedup target)")
        return self

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """A bare name stands for its mapping: ``magnitude`` -> ``{method: magnitude}``."""
        if isinstance(value, list):
            return [{"method": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("methods", "seeds")
    @classmethod
    def _non_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("methods")
    @classmethod
    def _distinct_labels(cls, value: list[GridMethod]) -> list[GridMethod]:
        """Results are grouped by label, so two different choices must not share one."""
        seen: dict[str, GridMethod] = {}
        for choice in value:
            other = seen.setdefault(choice.name, choice)
            if other is choice:
                continue
            if other == choice:
                raise ValueError(f"method {choice.name!r} is listed twice")
            raise ValueError(f"two methods are labelled {choice.name!r} but differ (e.g. in "
                             f"options); give each a distinct label")
        return value


class RunSpec(CheckedModel):
    """One cell of the grid."""

    choice: MethodChoice
    target_kind: TargetKind
    target_value: float
    seed: int
    recovery: RecoveryConfig


class SweepSpec(ExperimentConfig):
    """A benchmark: the experiment (model, data, recipes, schedule) and the grid to sweep."""

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$",
                      description="names the sweep in its folder: letters, digits, _ . -")
    grid: Grid
    threads: int | None = Field(None, ge=1, description="torch threads per run (default: split)")

    def recoveries(self) -> list[Recovery]:
        return self.grid.recoveries or [self.recovery]

    def recoveries_for(self, choice: MethodChoice) -> list[Recovery]:
        """The recoveries ``choice`` runs with: its own if listed with it, else the grid's;
        plus Scratch-B for a channel method when controls are on (Liu et al.'s baseline for a
        pruned architecture)."""
        from prunelab.methods import METHODS

        recoveries = self.grid.own_recoveries(choice) or self.recoveries()
        if (self.grid.controls and METHODS.get(choice.method).granularity == "channel"
                and not any(r.kind == "scratch-b" for r in recoveries)):
            recoveries = [*recoveries, RECOVERIES.get("scratch-b")()]
        return recoveries

    def runs(self) -> list[RunSpec]:
        """Every run of the grid, in a stable order (seeds outermost)."""
        return [
            RunSpec(choice=choice, target_kind=kind, target_value=value, seed=seed,
                    recovery=recovery)
            for seed in self.grid.seeds
            for choice in self.grid.choices()
            for kind, value in self.grid.targets.pairs()
            for recovery in self.recoveries_for(choice)
        ]

    def experiment_fields(self) -> dict[str, Any]:
        """What determines results (not the name, data location, grid, thread count or
        tracking)."""
        return self.model_dump(mode="json",
                               exclude={"name", "data_dir", "grid", "threads", "track"})

    def run_key(self, run: RunSpec) -> str:
        fields = run.model_dump(mode="json", exclude={"choice": {"label"}})
        fields["choice"]["options"] = run.choice.settings()
        return config_hash({"experiment": self.experiment_fields(), "run": fields})

    def dense_run_key(self, seed: int, choice: MethodChoice | None = None) -> str:
        return f"dense-{self.dense_key(seed, choice)}"

    def dense_variants(self) -> list[MethodChoice | None]:
        """Plain dense training, plus one per method that trains its own way (slimming...)."""
        variants: list[MethodChoice | None] = [None]
        for choice in self.grid.choices():
            if training_variant(choice) and all(
                v is None or training_variant(v) != training_variant(choice) for v in variants
            ):
                variants.append(choice)
        return variants

    def variant_of(self, run: RunSpec) -> MethodChoice | None:
        return run.choice if training_variant(run.choice) else None

    def snapshot_epochs(self) -> set[int]:
        return set().union(*(r.snapshot_epochs() for c in self.grid.choices()
                             for r in self.recoveries_for(c)))

    def check_plan(self, choices: Sequence[MethodChoice] = (),
                   recoveries: Sequence[Recovery] = ()) -> None:
        choices = [*choices, *self.grid.choices()]
        recoveries = [*recoveries, *{r.label(): r for c in self.grid.choices()
                                     for r in self.recoveries_for(c)}.values()]
        super().check_plan(choices, recoveries)
        for choice in self.grid.choices():
            method = METHODS.get(choice.method).create(**choice.options)
            for kind, value in self.grid.targets.pairs():
                method.check_request("latency" if kind == "latency_speedup" else kind, value,
                                     choice.scope)
