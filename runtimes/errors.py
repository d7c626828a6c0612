"""The error hierarchy of slmedge, and the exit code each error maps to.

Every error says what was asked, what exists, and what to do next. The CLI prints
``str(error)`` as one line and exits with ``error.exit_code``; no traceback.

Exit codes (also in ``slmedge --help``):
  0 ok, 1 error, 2 usage (bad arguments, missing input, bad config or profile),
  3 quality gate failed (parity, perplexity), 4 unsupported (architecture, op, provider).
"""

from __future__ import annotations

import re

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


def validation_problems(error, limit: int | None = None, *, top: str = "(top level)",
                        name=None, explain=None) -> str:
    """The one-line form of a pydantic ``ValidationError`` that a :class:`UsageError` carries
    for a config or file that was refused: ``field <path>: <message>`` per error, joined by
    ``; `` -- the first ``limit`` errors and ``and N more`` when there are more.

    The path is the dotted location (``inner.threads``, list items by index); a model-level
    check names ``top``, or the field its message starts with (``devices: the name 'a' is
    used twice`` -> ``field devices: the name ...``). The message is pydantic's, except that a
    missing field says ``required`` and a validator's ``ValueError`` its own text (without
    pydantic's ``Value error, ``).

    Callers that know more than the error holds pass hooks, each given pydantic's error dict:
    ``name(err) -> str`` names the field ('' for the top level), e.g. a fleet's device by its
    name; ``explain(err) -> str | None`` gives the message (None: the default above), e.g. a
    profile's allowed values."""
    errors = error.errors()
    shown = errors if limit is None else errors[:limit]
    out = [_problem(err, top, name, explain) for err in shown]
    if len(errors) > len(shown):
        out.append(f"and {len(errors) - len(shown)} more")
    return "; ".join(out)


_FIELD_HEAD = re.compile(r"^[A-Za-z_][\w.\[\]]*$")


def _problem(err: dict, top: str, name, explain) -> str:
    field = name(err) if name is not None else ".".join(map(str, err.get("loc", ())))
    message = explain(err) if explain is not None else None
    if message is None:
        kind = err.get("type", "")
        if kind == "missing":
            message = "required"
        elif kind in ("value_error", "assertion_error") and (err.get("ctx") or {}).get("error"):
            message = str(err["ctx"]["error"])
        else:
            message = str(err.get("msg", ""))
    if not field:
        # a model-level check whose message starts with the field it is about
        head, sep, rest = message.partition(": ")
        if sep and _FIELD_HEAD.match(head):
            field, message = head, rest
        else:
            field = top
    return f"field {field}: {message}"
