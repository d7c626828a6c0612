"""What the manifest records about a model source; imported by ``sources`` and
``gguf_source`` alike (it lived in ``sources``, which imports ``gguf_source``: a cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceInfo:
    """Where a model came from, for the manifest."""

    kind: str  # "hf-dir" | "hub" | "gguf"
    location: str
    sha256: dict[str, str] = field(default_factory=dict)
    revision: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}
