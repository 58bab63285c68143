"""Errors meant for people: one line naming what was wrong and what was expected, with a "did you
mean" where the value is close to a known name (a preset, a config key, a domain, a command).

The CLI turns any `UserError` into that line on stderr and exit code 2, without a traceback.
Library callers can catch it like any exception.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(value: object, choices: Iterable[str]) -> str | None:
    """The known name closest to a mistyped `value` (difflib's ratio >= 0.6: 'tinny' -> 'tiny',
    'lrr' -> 'lr', 'gdc' -> 'gcd'), or None when nothing is that close or `value` is not a string."""
    if not isinstance(value, str) or not value:
        return None
    names = [str(c) for c in choices]
    match = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
    if not match:  # a case slip ('GCD') scores low on the raw ratio
        lowered = {n.lower(): n for n in names}
        match = [lowered[m] for m in difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)]
    return match[0] if match and match[0] != value else None


def did_you_mean(suggestion: str | None) -> str:
    """"did you mean 'x'? " (to put before what was expected), or "" without a suggestion."""
    return f"did you mean {suggestion!r}? " if suggestion else ""


class UserError(Exception):
    """Bad input from the user (config, domain, model path, checkpoint, run directory)."""


class ConfigError(UserError):
    """A config field has an unknown name, a wrong type or an out-of-range value. `choices`: the names
    the value should have been one of (the message then suggests the closest); `suggestion`: a
    suggestion already made (e.g. a full dotted key)."""

    def __init__(self, field: str, value: object, expected: str, *, choices: Iterable[str] | None = None,
                 suggestion: str | None = None):
        self.field, self.value, self.expected = field, value, expected
        self.suggestion = suggestion or (closest(value, choices) if choices is not None else None)
        super().__init__(f"config field '{field}' = {value!r}: {did_you_mean(self.suggestion)}expected {expected}")


class NumericalFault(RuntimeError):
    """A NaN or infinite loss or gradient during training."""
