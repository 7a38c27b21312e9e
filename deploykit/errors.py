"""Errors a user can act on.

Every failure deploykit expects (bad recipe, wrong checkpoint, existing output,
failed numeric check...) is a ``DeployError`` whose message is one line that
says what to change. The CLI prints the message and exits with ``exit_code``;
the codes are documented in README.md so scripts can branch on them.
"""

from __future__ import annotations


class DeployError(Exception):
    exit_code = 1


class RecipeError(DeployError):
    exit_code = 3


class CheckpointError(DeployError):
    exit_code = 4


class OutputExistsError(DeployError):
    exit_code = 5


class InputError(DeployError):
    """Input data (points, tensors, shapes) that the model cannot take."""

    exit_code = 6


class ExportError(DeployError):
    exit_code = 7


class CheckFailedError(DeployError):
    """The exported engine disagrees with PyTorch beyond the recipe's tolerance."""

    exit_code = 8


class EngineError(DeployError):
    exit_code = 9


class RigError(RecipeError):
    """A camera rig (calib/rigs/*.json) that cannot serve the recipe."""


class GateFailedError(DeployError):
    """A candidate regressed beyond the recipe's gate thresholds."""

    exit_code = 10


class BaselineError(DeployError):
    """A gate baseline that is missing, unreadable, or from another recipe or machine class."""

    exit_code = 11
