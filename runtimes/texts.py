"""The texts shipped inside the package (``runtimes/data/``, sources and licence in
``data/SOURCES.md``): the default evaluation text and the default calibration text.

They live on the torch-free side so that a core install (``slmedge eval`` on a Pi) has the
same default as the exporter's quality card. Found through :mod:`importlib.resources`,
wherever pip put the package; never through the repository checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: Jane Austen, Mansfield Park (Project Gutenberg #141): perplexity / agreement.
EVAL_TEXT_NAME = "eval_mansfield_park.txt"
#: Jane Austen, Emma (Project Gutenberg #158): a different book, so calibrating does not
#: flatter the evaluation.
CALIBRATION_TEXT_NAME = "calib_emma.txt"


def _packaged(name: str) -> Path:
    # A wheel installs as files on disk, so the resource is a real path (a zipped package
    # would need resources.as_file; slmedge is not zip-safe).
    return Path(str(resources.files("slmedge.runtimes") / "data" / name))


def default_eval_text() -> Path:
    """The packaged evaluation text (Mansfield Park)."""
    return _packaged(EVAL_TEXT_NAME)


def default_calibration_text() -> Path:
    """The packaged calibration text (Emma)."""
    return _packaged(CALIBRATION_TEXT_NAME)
