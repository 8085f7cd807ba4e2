"""The one exception type for bad user input: the CLI turns it into exit code 2 and a one-line reason."""

from __future__ import annotations


class ScapError(ValueError):
    """Bad input (model, data, stats, SPEC ...). str(error) is a one-line message for the user."""
