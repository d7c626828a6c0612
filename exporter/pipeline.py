"""``slmedge export``'s entry point: a device profile's flow or the plain ONNX flow.

``run_export`` picks the flow; the flows never call back into it, so the modules form a tree
(``pipeline -> profile_export -> export``) instead of the ``export <-> profile_export`` cycle
that an entry point inside ``export.py`` needed. Every flow runs on the one export skeleton
(:mod:`.skeleton`: check output -> load -> stage -> convert -> support files -> parity ->
card -> manifest -> rename) and supplies only its own steps.
"""

from __future__ import annotations

from slmedge.exporter.onnx.export import ExportConfig, Progress, export_onnx
from slmedge.exporter.onnx.profile import run_profile_export
from .quiet import quiet_libraries

__all__ = ["ExportConfig", "run_export"]


def run_export(
    config: ExportConfig, progress: Progress | None = None, command: str | None = None
) -> dict:
    """Export, verify and write an artifact; returns the manifest.

    ``config.profile``: the device profile's recipe decides the rest (``profile_export``);
    else the ONNX export. ``command`` is recorded in the manifest."""
    with quiet_libraries():
        if config.profile:
            return run_profile_export(config, progress, command)
        return export_onnx(config, progress, command)
