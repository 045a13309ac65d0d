"""The methods reference, generated from the registries and docstrings so the docs cannot drift:
docs/methods.md (``prunelab methods --markdown``: every method, schedule and recovery on one page)
and the documentation site's page per method (generated when the site is built)."""

from __future__ import annotations

from prunelab.methods import METHODS, Method, method_section, methods_markdown
from prunelab.methods.layerwise import ReconstructionMethod
from prunelab.recoveries import RECOVERIES
from prunelab.schedules import SCHEDULES
from prunelab.strategies import strategies_markdown
from prunelab.structured import StructuredMethod

STRATEGIES = (("Schedules (when to prune)", SCHEDULES),
              ("Recoveries (after pruning)", RECOVERIES))


def reference_markdown() -> str:
    """The methods reference followed by the schedules and recoveries."""
    sections = [methods_markdown()]
    sections += ["\n".join(strategies_markdown(title, registry))
                 for title, registry in STRATEGIES]
    return "\n".join(sections)


def method_pages() -> dict[str, str]:
    """One page per registered method, keyed by its path in the site (``methods/NAME.md``)."""
    return {f"methods/{name}.md": _method_page(name, cls) for name, cls in METHODS.items()}


def _method_page(name: str, cls: type[Method]) -> str:
    if _learned(cls):
        use = [f"It acts while the model trains, so it runs through the harness, which trains the "
               f"dense model with the method's `training_callbacks()` and then prunes: "
               f"`prunelab run --method {name}`, or `methods: [{name}]` in a sweep spec "
               f"([Learned sparsity](../learned.md), [Slimmable networks](../slimmable.md))."]
    else:
        data = ", data=batches" if cls.needs_data else ""
        target = "speedup=2.0" if issubclass(cls, StructuredMethod) else "sparsity=0.5"
        use = ["```python", f'prunelab.prune(model, "{name}", {target}{data})', "```", "",
               f"From the command line: `prunelab run --method {name}`; in a sweep spec: "
               f"`methods: [{name}]`."]
    lines = [f"# `{name}`", "", f"*How it decides:* {_how(cls)}. The other methods: "
             f"[all on one page](../methods.md).", "", *use, "", "## Reference", "",
             *method_section(cls)]
    return "\n".join(lines)


def _how(cls: type[Method]) -> str:
    """The survey's *how* axis: the class's own word, else read from what it implements."""
    if cls.decides:
        return cls.decides
    if issubclass(cls, ReconstructionMethod):
        return "a layerwise solver that removes weights and rewrites the kept ones"
    if _learned(cls):
        return ("learned while the model trains (it adds training callbacks: a penalty, gates or "
                "a supernet), then pruned")
    if cls.needs_data:
        return "a score computed from the weights and calibration data; the lowest go"
    return "a score computed from the weights alone; the lowest go"


def _learned(cls: type[Method]) -> bool:
    """Whether the method acts while the model trains (it contributes training callbacks)."""
    return cls.training_callbacks is not Method.training_callbacks
