"""A device fleet: the same artifacts benchmarked on several Pis / phones / this machine at once.

A fleet file (YAML) names the devices::

    timeout_s: 1800            # per device (default), a device may override it
    devices:
      - name: pi5-kitchen
        target: ssh://pi@pi5.local/~/slmedge
        profile: rpi5          # device profile: providers and their options
        tags: [pi, arm64]
      - name: pixel8
        target: adb://38011FDJH000J3
        profile: android-cpu
        tags: [phone]
      - name: laptop
        target: local

:func:`run_fleet` runs one thread per device. A device runs its artifacts one after the
other (never two benches at once on one device); devices run concurrently. Every bench is a
child process (``ssh``, ``adb`` or a local ``python -m slmedge.runtimes.bench.runner``) that is
killed when the device's time is up, so a dead or slow device never blocks the others: its
error (naming the device) goes into the merged document and the rest complete.

The merged document (``kind: slmedge.fleet-bench``)::

    {"kind": "slmedge.fleet-bench", "schema_version": 1, "fleet": "fleet.yaml",
     "started_at": ..., "wall_s": ..., "artifacts": [...],
     "devices": [{"name", "target", "profile", "tags", "status": "ok" | "failed",
                  "wall_s", "errors": [...]}],
     "results": [bench result, each with "device": NAME],      # bench_schema.BenchResult
     "errors": [{"device", "target", "artifact", "type", "message", "partial"}]}

No torch; no pydantic beyond what the profiles already need.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmedge.runtimes.bench.runner import BenchConfig
from slmedge.runtimes.errors import SlmEdgeError, UsageError, validation_problems

FLEET_SCHEMA_VERSION = 1
FLEET_KIND = "slmedge.fleet-bench"
DEFAULT_DEVICE_TIMEOUT_S = 1800.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: (device name, message) -> None
DeviceSay = Callable[[str, str], None]


class Device(BaseModel):
    """One machine of the fleet."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="unique name, used in results and reports "
                                  "(letters, digits, '.', '_', '-')")
    target: str = Field(description="where to run: ssh://[user@]host[:port][/dir], "
                                    "adb://[SERIAL][/dir], or local (this machine)")
    profile: str | None = Field(default=None, description="device profile (built-in name or "
                                "YAML path): execution providers and their options")
    tags: list[str] = Field(default_factory=list, description="labels to select devices with "
                            "--tags (e.g. pi, phone, arm64)")
    timeout_s: float | None = Field(default=None, gt=0, description="this device's time limit "
                                    "for all its benches, seconds (default: the fleet's)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a valid device name (letters, digits, '.', '_', "
                             "'-'; starting with a letter or digit)")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if v == "local":
            return v
        from .remote import parse_target

        try:
            parse_target(v)
        except UsageError as e:
            raise ValueError(str(e).replace("--target ", "")) from None
        return v


class Fleet(BaseModel):
    """A fleet file: devices and the default per-device time limit."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(default=DEFAULT_DEVICE_TIMEOUT_S, gt=0,
                             description="default time limit per device, seconds (all its "
                                         "benches together, copying and venv set-up included)")
    devices: list[Device] = Field(min_length=1, description="the devices")

    @model_validator(mode="after")
    def _unique(self) -> Fleet:
        seen: set[str] = set()
        for d in self.devices:
            if d.name in seen:
                raise ValueError(f"devices: the name {d.name!r} is used twice; names must be "
                                 "unique")
            seen.add(d.name)
        return self

    def select(self, tags: list[str] | None) -> list[Device]:
        """Devices carrying any of ``tags`` (all devices when no tags are given)."""
        if not tags:
            return list(self.devices)
        chosen = [d for d in self.devices if set(tags) & set(d.tags)]
        if not chosen:
            known = sorted({t for d in self.devices for t in d.tags})
            raise UsageError(f"--tags {','.join(tags)}: no device of the fleet carries these "
                             f"tags; tags in the fleet: {', '.join(known) or '(none)'}")
        return chosen


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a fleet YAML file; errors name the file and the field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--fleet {p}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--fleet {p}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise UsageError(f"fleet {p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"fleet {p}: expected a mapping with a 'devices:' list, got "
                         f"{type(data).__name__}")
    try:
        return Fleet.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"fleet {p}: " + validation_problems(
            e, top="(fleet)", name=lambda err: _field(err, data), explain=_explain)) from None


def _field(err: dict, data: dict) -> str:
    """The field's dotted name with a device named as ``devices[0] (pixel)``."""
    loc = list(err.get("loc", ()))
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int) and i > 0 and loc[i - 1] == "devices":
            try:
                name = data["devices"][part].get("name")
            except (KeyError, IndexError, AttributeError, TypeError):
                name = None
            parts[-1] = f"devices[{part}]" + (f" ({name})" if name else "")
        else:
            parts.append(str(part))
    return ".".join(parts)


def _explain(err: dict) -> str | None:
    """An unknown field: the fields allowed where it stands (else the formatter's message)."""
    if err.get("type") != "extra_forbidden":
        return None
    loc = list(err.get("loc", ()))
    model = Device if "devices" in loc and len(loc) > 2 else Fleet
    return f"unknown field; allowed fields here: {', '.join(model.model_fields)}"


# -- running ----------------------------------------------------------------------------------


class _Local:
    """``local`` as a transport for :func:`remote._stream_run`: the runner as a child process
    of this Python, so a per-device timeout can kill it like an ssh or adb client."""

    scheme = "local"

    def describe(self) -> str:
        return "local"

    def popen(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)


def run_local_bench(artifact: str | Path, config: BenchConfig, *, providers=None,
                    strict: bool = False, allow_cpu_fallback: bool = True,
                    progress=None, on_started=None, max_seconds: float | None = None) -> dict:
    """Run the benchmark in a child process here (killable, unlike a thread)."""
    from .remote import _stream_run

    cfg = config.to_dict()
    cfg["label"] = cfg["label"] or Path(artifact).resolve().name
    argv = [sys.executable, "-u", "-m", "slmedge.runtimes.bench.runner", str(artifact),
            "--config-json", json.dumps(cfg), "--events", "--exit-on-stdin-eof"]
    if max_seconds:
        argv += ["--max-seconds", str(int(max_seconds) + 1)]
    if providers:
        argv += ["--providers-json", json.dumps([list(p) for p in providers])]
    if strict:
        argv.append("--strict")
    if not allow_cpu_fallback:
        argv.append("--no-cpu-fallback")
    local = _Local()
    return _stream_run(local, argv, local, progress or (lambda _m: None), None, on_started)


#: ``profile name -> run_*_bench keywords`` (providers, CPU-fallback rule); the caller passes
#: ``slmedge.device_profiles.session_kwargs``: runtimes/ sits below device_profiles/.
SessionKwargs = Callable[[str], dict]


@dataclass
class _DeviceRun:
    device: Device
    deadline: float
    results: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    timed_out: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    t0: float = 0.0
    wall_s: float | None = None


def _error(device: Device, artifact: str, exc: BaseException, partial=None) -> dict:
    return {"device": device.name, "target": device.target, "artifact": artifact,
            "type": type(exc).__name__, "message": f"device {device.name} ({device.target}): "
            f"{exc}", "partial": partial}


def _bench_one(run: _DeviceRun, artifact: str, config: BenchConfig, say: DeviceSay,
               bench_fn, session_kwargs: SessionKwargs | None) -> None:
    d = run.device
    remaining = max(1.0, run.deadline - time.monotonic())
    if d.profile and session_kwargs is None:
        raise UsageError(f"device {d.name} names profile {d.profile}, but no profile loader "
                         "was given to run_fleet (session_kwargs=)")
    kwargs = dict(progress=lambda m: say(d.name, m), on_started=run.procs.append,
                  max_seconds=remaining, **(session_kwargs(d.profile) if d.profile else {}))
    if bench_fn is not None:
        result = bench_fn(d, artifact, config, **kwargs)
    elif d.target == "local":
        result = run_local_bench(artifact, config, **kwargs)
    else:
        from .remote import run_remote_bench

        result = run_remote_bench(d.target, artifact, config, **kwargs)
    result["device"] = d.name
    run.results.append(result)


def _device_worker(run: _DeviceRun, artifacts: list[str], config: BenchConfig, say: DeviceSay,
                   bench_fn, session_kwargs: SessionKwargs | None = None) -> None:
    run.t0 = time.monotonic()
    try:
        for artifact in artifacts:  # one bench at a time on this device
            if run.timed_out:
                break
            try:
                _bench_one(run, artifact, config, say, bench_fn, session_kwargs)
                say(run.device.name, f"done: {Path(artifact).name}")
            except Exception as e:  # noqa: BLE001 - every failure is this device's, recorded
                if run.timed_out:
                    break
                run.errors.append(_error(run.device, artifact, e, getattr(e, "partial", None)))
                say(run.device.name, f"failed: {e}")
    finally:
        run.wall_s = round(time.monotonic() - run.t0, 3)
        run.done.set()


def _kill(run: _DeviceRun) -> None:
    """Kill the device's runner process, and the ``ssh`` / ``adb`` clients this process
    started for it while preparing the target (probe, copy, venv: ``subprocess.run`` calls
    that have their own, longer, time limits)."""
    for proc in run.procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
    marker = _client_marker(run.device)
    if marker is None:
        return
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            argv = child.cmdline()
            if argv and Path(argv[0]).name in ("ssh", "adb") and _is_for(argv, marker):
                child.kill()
        except psutil.Error:
            continue


def _client_marker(device: Device) -> tuple[str, str | None] | None:
    """(host or serial, port) that the device's ssh / adb command lines carry."""
    if device.target == "local":
        return None
    from .remote import parse_target

    t = parse_target(device.target)
    return (t.host, str(t.port) if t.port else None)


def _is_for(argv: list[str], marker: tuple[str, str | None]) -> bool:
    host, port = marker
    if Path(argv[0]).name == "adb":
        return "-s" in argv and argv[argv.index("-s") + 1:][:1] == [host]
    if "--" not in argv or argv[argv.index("--") + 1:][:1] != [host]:
        return False
    return port is None or ("-p" in argv and argv[argv.index("-p") + 1:][:1] == [port])


class _Timeout(SlmEdgeError):
    pass


def run_fleet(fleet: Fleet, artifacts: list[str | Path], config: BenchConfig | None = None, *,
              tags: list[str] | None = None, progress: DeviceSay | None = None,
              fleet_path: str | None = None, bench_fn=None,
              session_kwargs: SessionKwargs | None = None) -> dict:
    """Bench every artifact on every selected device; return the merged document.

    ``bench_fn(device, artifact, config, progress=, on_started=, max_seconds=, ...)`` replaces
    the real runner (tests); by default ``local`` runs a child process here and ``ssh://`` /
    ``adb://`` go through :func:`remote.run_remote_bench`. ``session_kwargs(profile_name)``
    gives a device's session settings from its profile (``device_profiles.session_kwargs``).
    """
    config = config or BenchConfig()
    devices = fleet.select(tags)
    arts = [str(a) for a in artifacts]
    lock = threading.Lock()

    def say(name: str, message: str) -> None:
        if progress:
            with lock:
                progress(name, message)

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    runs = [_DeviceRun(d, t0 + (d.timeout_s or fleet.timeout_s)) for d in devices]
    threads = []
    for run in runs:
        say(run.device.name, f"starting on {run.device.target}: {len(arts)} artifact(s)")
        t = threading.Thread(target=_device_worker, args=(run, arts, config, say, bench_fn,
                                                           session_kwargs),
                             name=f"fleet-{run.device.name}", daemon=True)
        t.start()
        threads.append(t)
    for run in runs:
        run.done.wait(timeout=max(0.0, run.deadline - time.monotonic()))
        if not run.done.is_set():
            run.timed_out = True
            _kill(run)  # its ssh / adb / local runner: the thread then returns by itself
            limit = run.device.timeout_s or fleet.timeout_s
            current = arts[min(len(run.results) + len(run.errors), len(arts) - 1)]
            run.errors.append(_error(run.device, current, _Timeout(f"timed out after {limit:g} s (the fleet's timeout_s / the device's); "
                         f"{len(run.results)} of {len(arts)} benches finished")))
            say(run.device.name, f"timed out after {limit:g} s")
            run.done.wait(timeout=15)  # let the worker see the kill; never wait longer
    devices_doc = []
    for run in runs:
        d = run.device
        devices_doc.append({"name": d.name, "target": d.target, "profile": d.profile,
                            "tags": d.tags, "status": "failed" if run.errors else "ok",
                            "results": len(run.results), "wall_s": run.wall_s,
                            "errors": [e["message"] for e in run.errors]})
    return {
        "kind": FLEET_KIND,
        "schema_version": FLEET_SCHEMA_VERSION,
        "fleet": fleet_path,
        "started_at": started_at,
        "wall_s": round(time.monotonic() - t0, 3),
        "artifacts": arts,
        "config": config.to_dict(),
        "devices": devices_doc,
        "results": [r for run in runs for r in list(run.results)],
        "errors": [e for run in runs for e in run.errors],
    }


def is_fleet_document(doc) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == FLEET_KIND
