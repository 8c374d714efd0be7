"""How a config leaf is declared: `option` (default, help, unit, choices, check), the value
checks, and `ConfigError`. Every config section is built from these — the run-wide ones in
`bdat_ray.config` and the plugins' own (an attack's ``attack.<name>.*``, a threat model's
``at.<name>.*``, a defense's ``defense.<name>.*``), which live beside the plugin's code and
are collected from its registry. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any

Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """Bad input. ``str(err)`` is one line: ``KEY: what is wrong and what is allowed``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self):
        # Ray ships a trial's exception to the driver by pickling it; the default reduce
        # would call ConfigError(str(err)) and fail on the missing second argument.
        return (type(self), (self.key, self.message))


def option(
    default: Any,
    help: str,
    *,
    unit: str = "",
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    check: Check | None = None,
) -> Any:
    """A config leaf. ``choices`` may be a callable so registries are consulted lazily."""
    return field(
        default=default,
        metadata={"help": help, "unit": unit, "choices": choices, "check": check},
    )


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be ≥ {low:g}"


def above(low: float) -> Check:
    return lambda v: None if v is None or v > low else f"must be > {low:g}"


def within(low: float, high: float) -> Check:
    return lambda v: None if v is None or low <= v <= high else f"must be in [{low:g}, {high:g}]"


def registry_names(module: str, attr: str) -> Callable[[], list[str]]:
    """Lazy ``choices``: the sorted names of the registry ``module.attr``."""

    def names() -> list[str]:
        return sorted(getattr(importlib.import_module(module), attr))

    return names
