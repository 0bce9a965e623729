"""Options in, settings out: where a parsed command line becomes frozen settings, once.

Each concern declares its settings as a frozen dataclass whose fields are named like its
command-line options, with the options' defaults as field defaults. The module's
``add_..._arguments`` takes every default from the dataclass (``default_of``), so a default is
written in exactly one place, and ``settings_from`` builds the dataclass from a parsed namespace.
Library functions then take settings, never the namespace: a misspelt option fails here, loudly,
instead of silently becoming a default deep inside the library.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of the settings dataclass ``cls`` (the option's default)."""
    for field in fields(cls):
        if field.name == name:
            if field.default is not MISSING:
                return field.default
            if field.default_factory is not MISSING:
                return field.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def settings_from(cls: type[T], namespace: Any, **overrides: Any) -> T:
    """``cls`` with every init field read from the attribute of the same name of ``namespace``
    (an ``argparse.Namespace``), unless given in ``overrides``."""
    values = {}
    for field in fields(cls):
        if field.init:
            values[field.name] = (
                overrides[field.name] if field.name in overrides else getattr(namespace, field.name)
            )
    return cls(**values)
