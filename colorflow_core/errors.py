"""Errors raised by colorflow_core; each carries a one-line, user-facing message."""
from __future__ import annotations

from pathlib import Path


class ColorFlowError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidInputError(ColorFlowError, ValueError):
    """An image, size or option the pipeline cannot work with."""


class MissingWeightsError(ColorFlowError, FileNotFoundError):
    """A weight or config file is missing; says which and where it belongs."""

    def __init__(self, file: str, folder: str | Path, how_to_get: str = "", kind: str = "weight file"):
        self.file = file
        self.folder = str(folder)
        self.how_to_get = how_to_get
        hint = f" ({how_to_get})" if how_to_get else ""
        super().__init__(f"missing {kind} '{file}': put it in '{self.folder}'{hint}")


class IncompatibleWeightsError(ColorFlowError):
    """A weight file exists but does not fit the model it is loaded into."""


class NonFiniteError(ColorFlowError, ArithmeticError):
    """A stage produced NaN or infinite values (non-finite weights or settings); names the stage."""
