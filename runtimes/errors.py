"""The error hierarchy of slmedge, and the exit code each error maps to.

Every error says what was asked, what exists, and what to do next. The CLI prints
``str(error)`` as one line and exits with ``error.exit_code``; no traceback.

Exit codes (also in ``slmedge --help``):
  0 ok, 1 error, 2 usage (bad arguments, missing input, bad config or profile),
  3 quality gate failed (parity, perplexity), 4 unsupported (architecture, op, provider).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_QUALITY_GATE = 3
EXIT_UNSUPPORTED = 4

EXIT_CODES_HELP = """\
exit codes:
  0  ok
  1  error (corrupt or truncated model file, failed export, runtime failure)
  2  usage (bad arguments, missing input path, invalid profile or config)
  3  quality gate failed (parity or perplexity outside the allowed limit)
  4  unsupported (architecture, operator or execution provider)"""


class SlmEdgeError(Exception):
    """Base class: an error the user can act on. Maps to exit code 1."""

    exit_code = EXIT_ERROR


class UsageError(SlmEdgeError):
    """Bad input from the user: a missing path, an invalid option or config."""

    exit_code = EXIT_USAGE


class ArtifactError(SlmEdgeError):
    """A model file or artifact directory that is corrupt, truncated or incomplete."""


class ModelSourceError(SlmEdgeError):
    """The model source (HF directory, hub id, GGUF file) could not be read."""


class QualityGateFailed(SlmEdgeError):
    """An exported artifact does not reproduce its reference closely enough."""

    exit_code = EXIT_QUALITY_GATE

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


class UnsupportedError(SlmEdgeError):
    """Something slmedge knows it cannot do (yet)."""

    exit_code = EXIT_UNSUPPORTED


class UnsupportedArchitecture(UnsupportedError):
    """A ``model_type`` with no registered architecture spec."""


class UnsupportedOp(UnsupportedError):
    """An operator the chosen runtime or provider cannot run."""


class ProviderUnavailable(UnsupportedError):
    """An execution provider that is not installed or not usable here."""


class MissingDependency(SlmEdgeError):
    """An optional extra (e.g. ``slmedge[export]``) is needed but not installed."""

    exit_code = EXIT_USAGE


def validation_problems(error, limit: int | None = None) -> str:
    """``field.path: message; ...`` for a pydantic ``ValidationError`` (its first ``limit``
    errors), the one-line form a UsageError carries for a config or file that was refused.
    Profiles and fleets explain more (allowed values, device names): their loaders' own."""
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                     for err in error.errors()[:limit])
