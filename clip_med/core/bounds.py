"""Range checks for numeric options, declared beside each default and checked once per config.

A field declared with :func:`bounded` carries its allowed range in the dataclass field's
metadata; :func:`check_bounds` walks a config (nested dataclasses, lists and dicts of them) and
refuses the first value out of range with a message naming its full key, e.g.
``data.loader.batch_size=-1 is out of range: it must be at least 1``. The command line calls
it when the config is composed (``clip_med.cli.config.to_object``) and library entry points
such as ``train(cfg)`` call it too, so a bad number stops a run before any work.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional


def bounded(default: Any, minimum: Optional[float] = None, maximum: Optional[float] = None,
            below: Optional[float] = None, above: Optional[float] = None) -> Any:
    """A dataclass field with ``default`` and a range: ``minimum``/``maximum`` inclusive,
    ``above``/``below`` exclusive. ``None`` values (for Optional fields) are always allowed."""
    bounds = {"minimum": minimum, "maximum": maximum, "below": below, "above": above}
    return dataclasses.field(default=default, metadata={"bounds": {k: v for k, v in bounds.items() if v is not None}})


def _problem(value: Any, bounds: dict[str, float]) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # the type itself is OmegaConf's check
    if isinstance(value, float) and math.isnan(value):
        return "it is not a number"
    rules = [("minimum", value < bounds.get("minimum", -math.inf), "at least"),
             ("maximum", value > bounds.get("maximum", math.inf), "at most"),
             ("above", value <= bounds.get("above", -math.inf), "above"),
             ("below", value >= bounds.get("below", math.inf), "below")]
    for name, broken, words in rules:
        if name in bounds and broken:
            return f"it must be {words} {bounds[name]:g}"
    return None


def check_bounds(config: Any, path: str = "") -> None:
    """Raise ValueError for the first declared range that ``config`` breaks (recursively)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for spec in dataclasses.fields(config):
            value = getattr(config, spec.name)
            bounds = spec.metadata.get("bounds")
            if bounds and value is not None:
                problem = _problem(value, bounds)
                if problem:
                    raise ValueError(f"{path}{spec.name}={value} is out of range: {problem}")
            check_bounds(value, f"{path}{spec.name}.")
    elif isinstance(config, list | tuple):
        for index, item in enumerate(config):
            check_bounds(item, f"{path}{index}.")
    elif isinstance(config, dict):
        for key, item in config.items():
            check_bounds(item, f"{path}{key}.")
