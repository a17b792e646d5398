"""Declared constraints on config values, checked in one place, as scikit-learn's `_parameter_constraints` are.

Every config dataclass lists its constraints in a `PARAMS` class attribute and calls `validate(self)` from
`__post_init__`; a bad value becomes one `UserError` line that names the option, the value and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from pathlib import PurePath
from typing import Callable

from pipeline.errors import UserError


@dataclass(frozen=True)
class OneOf:
    """A value among fixed choices."""

    choices: tuple

    def accepts(self, value) -> bool:
        return value in self.choices

    def expected(self) -> str:
        return "one of " + ", ".join(map(str, self.choices))


@dataclass(frozen=True)
class Interval:
    """An int or a float in [low, high]; `open_low`/`open_high` exclude the bound; None means unbounded."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, Integral if self.kind is int else Real):
            return False
        if not math.isfinite(value):
            return False
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        return not (below or above)

    def expected(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        show = (lambda v: str(int(v))) if self.kind is int else (lambda v: f"{v:g}")
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            return f"{noun} in {left}{show(self.low)}, {show(self.high)}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.open_low else '>='} {show(self.low)}"
        if self.high is not None:
            return f"{noun} {'<' if self.open_high else '<='} {show(self.high)}"
        return noun


@dataclass(frozen=True)
class Satisfies:
    """A value for which `test` is true (and does not raise); `description` says what that means."""

    test: Callable[[object], bool]
    description: str

    def accepts(self, value) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False

    def expected(self) -> str:
        return self.description


@dataclass(frozen=True)
class Optional:
    """None (the default: chosen automatically) or a value the inner constraint accepts."""

    inner: OneOf | Interval | Satisfies

    def accepts(self, value) -> bool:
        return value is None or self.inner.accepts(value)

    def expected(self) -> str:
        return self.inner.expected()


def is_json_of(kind: type, value) -> bool:
    """A value read from JSON is of `kind` (int, float, str, bool, list, dict): an int is a float, a bool is no
    number."""
    if kind in (int, float):
        return isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def option_name(field_name: str) -> str:
    """The CLI option of a config field: `top_k` -> `--top-k`."""
    return "--" + field_name.replace("_", "-")


def parse_option(option: str, text: str, parse: Callable[[str], object], expected: str):
    """The value of an option given as text (`parse` returns None for text it does not accept); one UserError line,
    worded as `validate`'s, for anything else."""
    value = parse(text) if isinstance(text, str) else None
    if value is None:
        raise UserError(f"{option} {text!r} is not valid (expected {expected})")
    return value


def validate(config) -> None:
    """Check every declared field of `config`; raise one UserError naming the first bad value."""
    declared = type(config).PARAMS
    names = {f.name for f in fields(config)}
    for name, constraint in declared.items():
        assert name in names, f"{type(config).__name__}.PARAMS names an unknown field {name!r}"
        value = getattr(config, name)
        if not constraint.accepts(value):
            option = getattr(type(config), "OPTIONS", {}).get(name, option_name(name))
            shown = repr(str(value)) if isinstance(value, PurePath) else repr(value)  # 'm.jpg', not PosixPath('m.jpg')
            raise UserError(f"{option} {shown} is not valid (expected {constraint.expected()})")


BOOLEAN = Satisfies(lambda v: isinstance(v, bool), "true or false")
POSITIVE = Interval(float, 0, None, open_low=True)
