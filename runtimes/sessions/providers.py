"""Execution-provider selection for ONNX Runtime sessions, and where the nodes ended up.

A session is built from an ordered list of ``(provider, options)`` (a device profile's
``runtime.providers``):

- Plugin providers shipped as separate wheels are registered first: QNN comes from
  ``onnxruntime-qnn`` as a plugin EP library (``ort.register_execution_provider_library``)
  and must then be added through its ``OrtEpDevice`` — passed by name in
  ``providers=[...]`` ONNX Runtime drops it without a word and runs everything on CPU.
- A provider that is not available here, or whose session creation fails, is skipped with a
  notice on stderr and the next one is tried; ``strict`` makes that an error.
- CPU fallback: ``allow_cpu_fallback=False`` or ``strict`` sets
  ``session.disable_cpu_ep_fallback=1`` (and leaves the CPU provider out of the list, which
  ONNX Runtime requires), so a node the accelerator cannot take fails the session; the
  error lists those nodes.
- Every session records its graph assignment (``session.record_ep_graph_assignment_info``):
  :func:`placement_of` says which provider runs how many nodes, and which ops stayed on CPU.
  A provider can be "in" a session and take no node at all (QNN without ``soc_model``):
  only this record shows it.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path

import onnxruntime as ort

from slmedge.runtimes.errors import ProviderUnavailable, UnsupportedOp

CPU = "CPUExecutionProvider"
ProviderSpec = tuple[str, dict]
Notify = Callable[[str], None]

#: Providers shipped as plugin EP libraries: name -> (python package, pip name).
PLUGIN_PROVIDERS = {"QNNExecutionProvider": ("onnxruntime_qnn", "onnxruntime-qnn")}
_registered: dict[str, str | None] = {}  # provider -> None (ok) or why it could not register
_selections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stderr(message: str) -> None:
    print(f"slmedge: {message}", file=sys.stderr, flush=True)


def register_plugin_provider(name: str) -> str | None:
    """Register the plugin EP library of ``name`` once; None if usable, else the reason."""
    if name in _registered:
        return _registered[name]
    package, pip_name = PLUGIN_PROVIDERS[name]
    reason = None
    if not hasattr(ort, "register_execution_provider_library"):
        reason = (f"onnxruntime {ort.__version__} has no plugin EP support "
                  "(register_execution_provider_library); upgrade onnxruntime")
    else:
        try:
            plugin = import_module(package)
        except ImportError:
            reason = f"{name} needs the {pip_name} package: pip install {pip_name}"
        else:
            try:
                ort.register_execution_provider_library(name, plugin.get_library_path())
            except Exception as e:  # ORT raises its own pybind types; keep the first line
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                if "already" not in first.lower():
                    reason = f"{pip_name} is installed but its library did not load: {first}"
    _registered[name] = reason
    return reason


def _plugin_devices(name: str) -> list:
    return [d for d in ort.get_ep_devices() if d.ep_name == name]


def availability(name: str) -> str | None:
    """None if provider ``name`` can be used here, else why not."""
    if name in PLUGIN_PROVIDERS:
        reason = register_plugin_provider(name)
        if reason is None and not _plugin_devices(name):
            reason = f"{name} registered but reports no device on this machine"
        return reason
    available = ort.get_available_providers()
    if name not in available:
        return (f"this onnxruntime build ({ort.__version__}) has no {name}; available: "
                f"{', '.join(available)}")
    return None


def available_providers() -> list[str]:
    """Built-in providers of this onnxruntime build plus the plugin ones that register."""
    names = list(ort.get_available_providers())
    names += [n for n in PLUGIN_PROVIDERS if n not in names and availability(n) is None]
    return names


@dataclass
class Selection:
    """What was asked, what the session got, and why providers were skipped."""

    requested: list[str]
    used: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"provider": ..., "reason": ...}
    cpu_fallback_allowed: bool = True
    strict: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Placement:
    """Which provider runs how many nodes; which ops stayed on CPU."""

    total_nodes: int
    nodes_by_provider: dict[str, int]
    ops_by_provider: dict[str, dict[str, int]]
    cpu_nodes: list[tuple[str, str]]  # (node name, op type) run by CPU while an accelerator was asked

    @property
    def cpu_ops(self) -> dict[str, int]:
        return dict(Counter(op for _, op in self.cpu_nodes).most_common())

    def share(self, provider: str) -> float:
        return self.nodes_by_provider.get(provider, 0) / self.total_nodes if self.total_nodes else 0.0

    def to_dict(self, max_nodes: int = 50) -> dict:
        return {
            "total_nodes": self.total_nodes,
            "nodes_by_provider": self.nodes_by_provider,
            "ops_by_provider": self.ops_by_provider,
            "cpu_ops": self.cpu_ops,
            "cpu_nodes": [list(n) for n in self.cpu_nodes[:max_nodes]],
            "cpu_nodes_truncated": max(0, len(self.cpu_nodes) - max_nodes),
        }


def placement_of(session: ort.InferenceSession) -> Placement | None:
    """The node assignment ONNX Runtime recorded for ``session`` (None if this onnxruntime
    cannot tell: ``get_provider_graph_assignment_info`` needs a recent version)."""
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is None:
        return None
    try:
        subgraphs = getter()
    except Exception:  # recording was off for this session (not built by create_session)
        return None
    ops: dict[str, Counter] = {}
    nodes: dict[str, list[tuple[str, str]]] = {}
    for sg in subgraphs:
        for node in sg.get_nodes():
            op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") \
                else node.op_type
            ops.setdefault(sg.ep_name, Counter())[op] += 1
            nodes.setdefault(sg.ep_name, []).append((node.name, op))
    counts = {ep: sum(c.values()) for ep, c in ops.items()}
    accelerated = [ep for ep in session.get_providers() if ep != CPU]
    return Placement(
        total_nodes=sum(counts.values()),
        nodes_by_provider=dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        ops_by_provider={ep: dict(c.most_common()) for ep, c in ops.items()},
        cpu_nodes=nodes.get(CPU, []) if accelerated else [],
    )


def selection_of(session: ort.InferenceSession) -> Selection | None:
    """The :class:`Selection` :func:`create_session` made for ``session``."""
    return _selections.get(session)


def session_report(session: ort.InferenceSession) -> dict:
    """Providers asked/used/skipped and the node placement, JSON-ready (bench, manifest)."""
    sel = selection_of(session)
    place = placement_of(session)
    return {
        "selection": sel.to_dict() if sel else {"used": session.get_providers()},
        "placement": place.to_dict() if place else None,
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _build(model_path, specs: list[ProviderSpec], opts: ort.SessionOptions,
           disable_cpu_fallback: bool) -> ort.InferenceSession:
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    opts.add_session_config_entry("session.disable_cpu_ep_fallback",
                                  "1" if disable_cpu_fallback else "0")
    if disable_cpu_fallback:
        # ONNX Runtime refuses an explicit CPU provider together with disabled fallback.
        specs = [(n, o) for n, o in specs if n != CPU]
    if any(n in PLUGIN_PROVIDERS for n, _ in specs):
        # Plugin EPs go through their devices; then every provider must go through the
        # session options (providers= would override them).
        for name, options in specs:
            strs = {k: str(v) for k, v in options.items()}
            if name in PLUGIN_PROVIDERS:
                opts.add_provider_for_devices(_plugin_devices(name), strs)
            else:
                opts.add_provider(name, strs)
        return ort.InferenceSession(str(model_path), sess_options=opts, enable_fallback=0)
    return ort.InferenceSession(
        str(model_path), sess_options=opts, providers=[n for n, _ in specs],
        provider_options=[{k: str(v) for k, v in o.items()} for _, o in specs],
        enable_fallback=0,  # ORT's own fallback prints to stdout; ours notifies on stderr
    )



def create_session(
    model_path: str | Path,
    providers: Sequence[ProviderSpec],
    make_options: Callable[[], ort.SessionOptions],
    *,
    strict: bool = False,
    allow_cpu_fallback: bool = True,
    notify: Notify | None = _stderr,
) -> ort.InferenceSession:
    """Build a session on the first usable providers of ``providers``.

    ``make_options()`` returns fresh session options (threads etc.) for each attempt.
    Raises :class:`ProviderUnavailable` when ``strict`` and a provider is missing or fails,
    or when nothing is left; :class:`UnsupportedOp` when CPU fallback is disabled and some
    nodes would need it (the message lists them by op type).
    """
    notify = notify or (lambda _m: None)
    specs = [(name, dict(opts)) for name, opts in providers] or [(CPU, {})]
    requested = [n for n, _ in specs]
    disable_fallback = strict or not allow_cpu_fallback
    accel_requested = any(n != CPU for n in requested)
    if disable_fallback and not accel_requested:
        disable_fallback = False  # CPU-only: there is nothing to fall back from
    sel = Selection(requested=requested, cpu_fallback_allowed=not disable_fallback, strict=strict)

    def skip(name: str, reason: str) -> None:
        rest = [n for n, _ in specs if n != name and n not in [s["provider"] for s in sel.skipped]]
        if strict:
            raise ProviderUnavailable(
                f"asked to use {name}, but {reason}; --strict forbids falling back"
                f"{' to ' + rest[0] if rest else ''}")
        sel.skipped.append({"provider": name, "reason": reason})
        notify(f"{name} not used: {reason}; falling back to {rest[0] if rest else CPU}")

    usable = []
    for name, options in specs:
        reason = availability(name)
        if reason is None:
            usable.append((name, options))
        else:
            skip(name, reason)
    if not any(n != CPU for n, _ in usable) and accel_requested and disable_fallback:
        if not strict:  # the profile forbade CPU fallback, but no accelerator is here at all
            notify("no accelerator available: running on CPU despite allow_cpu_fallback=false")
        disable_fallback = False
        sel.cpu_fallback_allowed = True
    if not usable:
        usable = [(CPU, {})]

    while True:
        try:
            session = _build(model_path, usable, make_options(), disable_fallback)
            break
        except Exception as e:  # ORT's pybind exception types; decide by what was asked
            message = _first_line(e)
            if disable_fallback and "fallback to CPU EP has been explicitly disabled" in message:
                raise _cpu_fallback_error(model_path, usable, make_options) from None
            accel = [n for n, _ in usable if n != CPU]
            if not accel or not _looks_like_provider_failure(e):
                raise
            skip(accel[0], f"session creation failed: {message}")
            usable = [(n, o) for n, o in usable if n != accel[0]] or [(CPU, {})]
            if not any(n != CPU for n, _ in usable):
                disable_fallback = False
                sel.cpu_fallback_allowed = True
    sel.used = [n for n in session.get_providers()]
    _selections[session] = sel
    place = placement_of(session)
    if place is not None:
        for name, _ in usable:
            if name != CPU and place.nodes_by_provider.get(name, 0) == 0:
                reason = (f"{name} was added but took none of the {place.total_nodes} nodes "
                          "(wrong options such as soc_model, or no supported op)")
                if strict:
                    raise ProviderUnavailable(f"{reason}; --strict forbids running on CPU")
                notify(reason)
    return session


def _looks_like_provider_failure(e: Exception) -> bool:
    """EP failures (EPFail, a provider rejecting the graph) versus a bad model file."""
    return type(e).__name__ not in ("InvalidProtobuf", "NoSuchFile")


def _cpu_fallback_error(model_path, usable, make_options) -> UnsupportedOp:
    """With CPU fallback disabled the session failed: build it once with fallback allowed to
    name the nodes that would have needed the CPU."""
    try:
        session = _build(model_path, usable, make_options(), disable_cpu_fallback=False)
        place = placement_of(session)
    except Exception:
        place = None
    accel = ", ".join(n for n, _ in usable if n != CPU)
    if place is None or not place.cpu_nodes:
        return UnsupportedOp(f"{accel} cannot run every node of {model_path} and CPU fallback "
                             "is disabled (allow_cpu_fallback false / --strict)")
    ops = ", ".join(f"{op} x{n}" for op, n in place.cpu_ops.items())
    return UnsupportedOp(
        f"{accel} cannot run {len(place.cpu_nodes)} of {place.total_nodes} nodes of "
        f"{Path(model_path).name} and CPU fallback is disabled: {ops}; run `slmedge check` for "
        "the node table, export with the profile's recipe, or allow CPU fallback"
    )


def decoder_report(decoder) -> dict | None:
    """:func:`session_report` of every session of a decoder (``model``, or ``prefill`` and
    ``decode`` for static-shape artifacts); None for a decoder without ORT sessions."""
    sessions = getattr(decoder, "sessions", None)
    if sessions is None and getattr(decoder, "session", None) is not None:
        sessions = {"model": decoder.session}
    if not sessions:
        return None
    return {kind: session_report(s) for kind, s in sessions.items()}
