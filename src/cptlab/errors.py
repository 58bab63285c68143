"""Errors meant for people: one line naming what was wrong and what was expected.

The CLI turns any `UserError` into that line on stderr and exit code 2, without a traceback.
Library callers can catch it like any exception.
"""


class UserError(Exception):
    """Bad input from the user (config, domain, model path, checkpoint, run directory)."""


class ConfigError(UserError):
    """A config field has an unknown name, a wrong type or an out-of-range value."""

    def __init__(self, field: str, value: object, expected: str):
        self.field, self.value, self.expected = field, value, expected
        super().__init__(f"config field '{field}' = {value!r}: expected {expected}")


class NumericalFault(RuntimeError):
    """A NaN or infinite loss or gradient during training."""
