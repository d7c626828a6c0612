"""Sweeps: models x recipes x profiles -> export -> quantize -> quality card -> bench -> Pareto.

A sweep file (YAML)::

    output: sweep-out              # relative to the sweep file
    models:
      - {name: smol, source: embedded:smollm2-135m-instruct}
      - {name: qwen, source: ./Qwen2.5-0.5B-Instruct}
    recipes:
      - {name: fp32}                              # the export itself
      - {name: int8, quant: {scheme: int8}}
      - {name: int4, quant: {scheme: int4, algorithm: gptq-act}, max_ppl_increase: 8}
    profiles: [null, rpi5]         # null: no device profile (this machine's CPU)
    quality: {eval_tokens: 1024}   # QualityConfig fields for every card
    bench: {prompt_tokens: 64, new_tokens: 32, repeats: 2, warmup: 1, threads: 2}
    fleet: fleet.yaml              # optional: bench on the fleet instead of locally
    pick: {max_ppl_increase: 5}    # the pick: fastest Pareto cell within this of the best

Execution (:func:`run_sweep`): first the exports a pending cell needs (one per model x
profile, fp32), then one task per cell (quantize -> quality card -> bench). Tasks run on a
``concurrent.futures`` process pool (default) or on Ray (``--ray auto|ADDRESS``, or a Ray
already initialised in this process) with resource requests: ``memory`` for an export and
a cell, and one task per fleet device for the benches.

Cache and resume: a cell's key is the sha256 of its inputs (source hash, recipe, profile,
quality and bench settings, fleet devices, slmedge version). A finished cell is written
atomically to ``OUTPUT/cells/KEY.json`` the moment it finishes, so a re-run computes only
cells without a file (new recipes, changed inputs, or the ones an interruption cut short).
Exports are cached the same way under ``OUTPUT/exports/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slmedge.runtimes.errors import UsageError, validation_problems

SWEEP_SCHEMA_VERSION = 1
CELL_KIND = "slmedge.sweep-cell"
Say = Callable[[str], None]


class SweepModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="short name used in cell names and the store")
    source: str = Field(description="what `slmedge export --model` takes: HF directory, hub "
                                    "id, .gguf file or embedded:NAME (relative paths: to the "
                                    "sweep file)")


class SweepRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="short name used in cell names and the store")
    quant: dict | None = Field(default=None, description="QuantRecipe fields (scheme, "
                               "block_size, algorithm, ...); None: the fp32 export itself")
    max_ppl_increase: float | None = Field(default=None, ge=0, description="this recipe's "
                                           "quality gate, percent (default: the quality "
                                           "section's)")


class PickRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_ppl_increase: float = Field(5.0, ge=0, description="the pick is the fastest Pareto "
                                    "cell within this many percent of the profile's best "
                                    "perplexity")


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    export_memory_mb: int = Field(4000, ge=1, description="Ray: memory asked for an export")
    cell_memory_mb: int = Field(2000, ge=1, description="Ray: memory asked for a quantize + "
                                "quality + bench cell")
    workers: int | None = Field(None, ge=1, description="process pool size (default: CPUs)")


class SweepConfig(BaseModel):
    """A sweep file."""

    model_config = ConfigDict(extra="forbid")
    output: str = Field("sweep-out", description="directory for exports, artifacts, cells and "
                        "the summary (relative to the sweep file)")
    models: list[SweepModel] = Field(min_length=1, description="source models")
    recipes: list[SweepRecipe] = Field(min_length=1, description="quantization recipes")
    profiles: list[str | None] = Field(default_factory=lambda: [None], description="device "
                                       "profiles (null: none, this machine's CPU)")
    quality: dict = Field(default_factory=dict, description="QualityConfig fields for every "
                          "quality card (eval_tokens, eval_text, max_ppl_increase, ...)")
    bench: dict = Field(default_factory=dict, description="BenchConfig fields (prompt_tokens, "
                        "new_tokens, repeats, warmup, threads, ...)")
    fleet: str | None = Field(None, description="fleet file: bench every cell on its devices "
                              "instead of locally")
    export_cache: str | None = Field(None, description="directory of fp32 exports shared "
                                     "between sweeps, keyed by source hash, profile, quality "
                                     "settings and slmedge version (default: OUTPUT/exports)")
    pick: PickRule = Field(default_factory=PickRule, description="how the pick is made")
    resources: Resources = Field(default_factory=Resources, description="task sizes")

    @model_validator(mode="after")
    def _unique(self) -> SweepConfig:
        for what, names in (("models", [m.name for m in self.models]),
                            ("recipes", [r.name for r in self.recipes])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: names used twice: {', '.join(dup)}")
        return self


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """Read and validate a sweep file; returns it and its directory (relative paths)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"sweep {p}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"sweep {p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"sweep {p}: expected a mapping with models: and recipes:")
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"sweep {p}: {validation_problems(e, top='(sweep)')}") from None
    from slmedge.exporter.quantize.pipeline import QualityConfig
    from slmedge.exporter.quantize.recipe import QuantRecipe
    from slmedge.runtimes.bench.runner import BenchConfig

    # every recipe and setting checked now, not in the middle of the sweep
    checks = [(f"recipes[{i}] ({r.name}).quant", QuantRecipe, r.quant)
              for i, r in enumerate(config.recipes) if r.quant is not None]
    checks += [("quality", QualityConfig, config.quality)]
    for where, model, fields in checks:
        try:
            model(**fields)
        except ValidationError as e:
            raise UsageError(f"sweep {p}: " + validation_problems(
                e, name=lambda err, where=where: ".".join([where, *map(str, err["loc"])])
            )) from None
    try:
        BenchConfig.from_dict(config.bench)
    except (ValueError, TypeError) as e:
        raise UsageError(f"sweep {p}: field bench: {e}") from None
    return config, p.resolve().parent


# -- inputs and keys --------------------------------------------------------------------------


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("slmedge")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "unknown"


def source_hash(source: str, base: Path) -> str:
    """sha256 of a source's bytes (every file of a directory, a GGUF file), or of its name
    (embedded:NAME and hub ids: versioned by the slmedge version / revision in the name)."""
    path = Path(source) if Path(source).is_absolute() else base / source
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
    if path.is_file():
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    return hashlib.sha256(f"name:{source}".encode()).hexdigest()


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _resolve_source(source: str, base: Path) -> str:
    if ":" in source.split("/")[0] or Path(source).is_absolute():
        return source  # embedded:NAME, or already absolute
    local = base / source
    return str(local) if local.exists() else source  # else a hub id


def plan(config: SweepConfig, base: Path) -> tuple[list[dict], dict[str, dict]]:
    """Every cell's spec (with its key) and every export the cells need."""
    version = _version()
    out = (base / config.output).resolve()
    fleet_devices = None
    if config.fleet:
        from slmedge.runtimes.bench.fleet import load_fleet

        fleet = load_fleet(base / config.fleet)
        fleet_devices = [(d.name, d.target, d.profile) for d in fleet.devices]
    hashes = {m.name: source_hash(m.source, base) for m in config.models}
    cache = (base / config.export_cache).resolve() if config.export_cache else out / "exports"
    exports: dict[str, dict] = {}
    cells = []
    for m in config.models:
        for profile in config.profiles:
            ekey = _key({"source": hashes[m.name], "profile": profile, "slmedge": version,
                         "quality": config.quality})
            exports.setdefault(ekey, {
                "key": ekey, "model": m.name, "source": _resolve_source(m.source, base),
                "profile": profile, "quality": config.quality,
                "output": str(cache / ekey[:16])})
            for r in config.recipes:
                inputs = {"source": hashes[m.name], "recipe": r.quant,
                          "max_ppl_increase": r.max_ppl_increase, "profile": profile,
                          "quality": config.quality, "bench": config.bench,
                          "fleet": fleet_devices, "slmedge": version}
                key = _key(inputs)
                cell = f"{m.name}/{r.name}/{profile or 'default'}"
                cells.append({
                    "key": key, "cell": cell, "model": m.name, "recipe": r.name,
                    "profile": profile, "quant": r.quant,
                    "max_ppl_increase": r.max_ppl_increase, "quality": config.quality,
                    "bench": config.bench, "bench_local": config.fleet is None,
                    "export": exports[ekey]["output"], "export_key": ekey,
                    "artifact": str(out / "artifacts" / f"{m.name}-{r.name}-"
                                    f"{profile or 'default'}-{key[:12]}") if r.quant else None,
                    "cell_file": str(out / "cells" / f"{key}.json"), "inputs": inputs})
    return cells, exports


# -- tasks (run in a pool worker or a Ray worker) ---------------------------------------------


def write_atomic(path: Path, doc: dict) -> None:
    """Write JSON so that a reader (or a re-run after a kill) sees all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_task(spec: dict) -> dict:
    """Export one model for one profile (fp32 + its quality card), cached by its key."""
    out = Path(spec["output"])
    done = out / ".sweep-export.json"
    if done.is_file():
        return dict(json.loads(done.read_text()), cached=True)
    from slmedge.exporter.pipeline import ExportConfig, run_export
    from slmedge.exporter.quantize.pipeline import QualityConfig

    t0 = time.perf_counter()
    quality = {k: v for k, v in spec["quality"].items() if k != "max_ppl_increase"}
    config = ExportConfig(model=spec["source"], output=out, profile=spec["profile"],
                          overwrite=True, quality=QualityConfig(**quality))
    manifest = run_export(config, command=f"slmedge sweep (export {spec['model']})")
    doc = {"key": spec["key"], "model": spec["model"], "source": spec["source"],
           "profile": spec["profile"], "output": str(out),
           "seconds": round(time.perf_counter() - t0, 2),
           "quality": manifest.get("quality")}
    write_atomic(done, doc)
    return doc


def cell_task(spec: dict) -> dict:
    """Quantize (unless fp32) -> quality card -> bench here (unless a fleet benches later).
    Writes the cell file atomically when it benched here; returns the cell document."""
    from slmedge.runtimes.errors import QualityGateFailed, SlmEdgeError

    t0 = time.perf_counter()
    doc = {"kind": CELL_KIND, "schema_version": SWEEP_SCHEMA_VERSION, "key": spec["key"],
           "cell": spec["cell"], "model": spec["model"], "recipe": spec["recipe"],
           "profile": spec["profile"], "inputs": spec["inputs"], "status": "complete",
           "error": None, "artifact": None, "size_mb": None, "perplexity": None,
           "ppl_increase_pct": None, "quality": None, "gate": None, "bench": None,
           "benches": None, "decode_tokens_per_s": None, "ttft_ms": None}
    try:
        artifact = Path(spec["export"])
        if spec["quant"] is not None:
            from slmedge.exporter.quantize.pipeline import QualityConfig, quantize_artifact
            from slmedge.exporter.quantize.recipe import QuantRecipe

            quality = dict(spec["quality"])
            if spec["max_ppl_increase"] is not None:
                quality["max_ppl_increase"] = spec["max_ppl_increase"]
            artifact = Path(spec["artifact"])
            quantize_artifact(Path(spec["export"]), artifact, QuantRecipe(**spec["quant"]),
                              QualityConfig(**quality), overwrite=True)
        from slmedge.runtimes.manifest_schema import load_manifest

        manifest = load_manifest(artifact)
        card = manifest.quality
        increase = card.ppl_increase_pct if card else None
        doc.update(artifact=str(artifact), size_mb=round(manifest.model_bytes() / 1e6, 3),
                   perplexity=card.perplexity if card else None,
                   ppl_increase_pct=0.0 if increase is None and spec["quant"] is None
                   else increase,
                   quality=card.model_dump(mode="json", exclude_unset=True) if card else {},
                   gate=manifest.gate.model_dump(mode="json", exclude_unset=True)
                   if manifest.gate else None)
        if spec["bench_local"]:
            from slmedge.runtimes.bench.runner import BenchConfig, run_bench

            kwargs = {}
            if spec["profile"]:
                from slmedge.device_profiles import load_profile

                prof = load_profile(spec["profile"])
                kwargs = {"providers": prof.provider_specs(),
                          "allow_cpu_fallback": prof.runtime.allow_cpu_fallback}
            cfg = BenchConfig.from_dict({**spec["bench"], "label": spec["cell"]})
            bench = run_bench(artifact, cfg, **kwargs)
            doc.update(bench=bench, decode_tokens_per_s=bench.get("decode_tokens_per_s"),
                       ttft_ms=bench.get("ttft_ms"))
    except SlmEdgeError as e:
        doc.update(status="gate-failed" if isinstance(e, QualityGateFailed) else "failed",
                   error=f"{type(e).__name__}: {e}", figures=getattr(e, "figures", None))
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    doc["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if spec["bench_local"] or doc["status"] != "complete":
        write_atomic(Path(spec["cell_file"]), doc)
    return doc


def fleet_device_task(fleet_path: str, device: str, artifacts: list[str], bench: dict) -> dict:
    """Ray: all of one device's benches (one task per device: a device never runs two)."""
    from slmedge.device_profiles import session_kwargs
    from slmedge.runtimes.bench.runner import BenchConfig
    from slmedge.runtimes.bench.fleet import load_fleet, run_fleet

    fleet = load_fleet(fleet_path)
    return run_fleet(fleet.model_copy(update={"devices": [d for d in fleet.devices
                                                          if d.name == device]}),
                     artifacts, BenchConfig.from_dict(bench), fleet_path=fleet_path,
                     session_kwargs=session_kwargs)


# -- executors --------------------------------------------------------------------------------


class _Pool:
    """``concurrent.futures`` process pool (spawned workers: no fork of a threaded process)."""

    name = "process-pool"

    def __init__(self, workers: int | None):
        import multiprocessing

        self.workers = workers or max(1, min(os.cpu_count() or 1, 4))
        self.ex = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def map_as_completed(self, fn, specs: list[dict], memory_mb: int):
        futures = {self.ex.submit(fn, s): s for s in specs}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield futures[f], f.result()

    def fleet(self, fleet_path: str, devices: list[str], artifacts: list[str], bench: dict):
        from slmedge.device_profiles import session_kwargs
        from slmedge.runtimes.bench.runner import BenchConfig
        from slmedge.runtimes.bench.fleet import load_fleet, run_fleet

        return [run_fleet(load_fleet(fleet_path), artifacts, BenchConfig.from_dict(bench),
                          fleet_path=fleet_path, session_kwargs=session_kwargs)]

    def close(self, cancel: bool = False) -> None:
        self.ex.shutdown(wait=not cancel, cancel_futures=cancel)
        if cancel:
            import multiprocessing

            for p in multiprocessing.active_children():
                p.terminate()


class _Ray:
    """Ray tasks with resource requests; connects to ``address`` unless Ray is running here."""

    name = "ray"

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray: pip install 'slmedge[sweep]' (or pip install "
                             "ray)") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == "local" else address,
                         include_dashboard=False, log_to_driver=False)
            except ConnectionError as e:
                raise UsageError(f"--ray {address}: cannot connect ({e}); start a cluster "
                                 "(ray start --head) or give its address") from None
            self.started = True
        self.name = f"ray ({ray.get_runtime_context().gcs_address})"

    def map_as_completed(self, fn, specs: list[dict], memory_mb: int):
        remote = self.ray.remote(num_cpus=1, memory=memory_mb * 1024 * 1024, max_retries=0)(fn)
        refs = {remote.remote(s): s for s in specs}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], self.ray.get(ref)

    def fleet(self, fleet_path: str, devices: list[str], artifacts: list[str], bench: dict):
        # one task per device, no CPU asked: the work happens on the device
        remote = self.ray.remote(num_cpus=0, max_retries=0)(fleet_device_task)
        return self.ray.get([remote.remote(fleet_path, d, artifacts, bench) for d in devices])

    def close(self, cancel: bool = False) -> None:
        if self.started:
            self.ray.shutdown()


# -- the sweep --------------------------------------------------------------------------------


def pareto(cells: list[dict], pick_pct: float) -> dict:
    """Per profile: the cells no other cell beats on size, perplexity and decode speed at
    once, and the pick (the fastest of them within ``pick_pct`` % of the best perplexity)."""
    out = {}
    for profile in sorted({c["profile"] or "default" for c in cells}):
        pts = [c for c in cells if (c["profile"] or "default") == profile
               and c["status"] == "complete" and c["size_mb"] is not None
               and c["perplexity"] is not None]

        def speed(c):
            return c["decode_tokens_per_s"] if c["decode_tokens_per_s"] is not None else -math.inf

        def dominates(a, b):
            ge = (a["size_mb"] <= b["size_mb"] and a["perplexity"] <= b["perplexity"]
                  and speed(a) >= speed(b))
            gt = (a["size_mb"] < b["size_mb"] or a["perplexity"] < b["perplexity"]
                  or speed(a) > speed(b))
            return ge and gt

        front = sorted((c for c in pts if not any(dominates(o, c) for o in pts)),
                       key=lambda c: c["size_mb"])
        entry = {"front": [c["cell"] for c in front], "pick": None, "why": None}
        if front:
            best = min(c["perplexity"] for c in front)
            ok = [c for c in front if c["perplexity"] <= best * (1 + pick_pct / 100)]
            pick = max(ok, key=lambda c: (speed(c), -c["size_mb"]))
            entry["pick"] = pick["cell"]
            entry["why"] = (
                f"fastest ({_f(pick['decode_tokens_per_s'])} tok/s) of the {len(ok)} Pareto "
                f"cell(s) within +{pick_pct:g}% of the best perplexity ({best:.3f}): perplexity "
                f"{pick['perplexity']:.3f}, {pick['size_mb']:.2f} MB; the front by size: "
                + ", ".join(f"{c['cell']} ({c['size_mb']:.2f} MB, ppl {c['perplexity']:.3f}, "
                            f"{_f(c['decode_tokens_per_s'])} tok/s)" for c in front))
        out[profile] = entry
    return out


def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def run_sweep(path: str | Path, *, ray: str | None = None, say: Say | None = None,
              on_cell: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a sweep file; returns the summary (also ``OUTPUT/sweep.json``).

    ``on_cell`` gets every cell computed in this run as it finishes (the CLI stores them).
    """
    say = say or (lambda _m: None)
    config, base = load_sweep(path)
    cells, exports = plan(config, base)
    out = (base / config.output).resolve()
    for stale in (out / "cells").glob(".*.tmp"):  # a cell cut short while being written
        stale.unlink(missing_ok=True)
    cached = {c["key"] for c in cells if Path(c["cell_file"]).is_file()}
    todo = [c for c in cells if c["key"] not in cached]
    say(f"{len(cells)} cells: {len(cached)} cached, {len(todo)} to compute")
    need = {c["export_key"] for c in todo}
    ex_specs = [e for k, e in exports.items() if k in need]
    t0 = time.perf_counter()
    computed: list[dict] = []
    runner = None
    if todo:  # nothing to compute: no pool started, no Ray cluster contacted
        runner = _Ray(ray) if ray else _Pool(config.resources.workers)
        say(f"executor: {runner.name}")
        try:
            for spec, doc in runner.map_as_completed(export_task, ex_specs,
                                                     config.resources.export_memory_mb):
                how = "cached" if doc.get("cached") else f"done ({doc['seconds']} s)"
                say(f"export {spec['model']} / {spec['profile'] or 'default'}: {how}")
            for spec, doc in runner.map_as_completed(cell_task, todo,
                                                     config.resources.cell_memory_mb):
                say(f"cell {spec['cell']}: {doc['status']}"
                    + (f" ({doc['error']})" if doc["error"] else ""))
                computed.append(doc)
                if on_cell and spec["bench_local"]:
                    on_cell(doc)
            if config.fleet and computed:
                _bench_on_fleet(config, base, runner, computed, todo, say, on_cell)
        except BaseException:
            runner.close(cancel=True)
            raise
        runner.close()
    every = [json.loads(Path(c["cell_file"]).read_text()) for c in cells
             if Path(c["cell_file"]).is_file()]
    summary = {"kind": "slmedge.sweep", "schema_version": SWEEP_SCHEMA_VERSION,
               "sweep": str(Path(path).resolve()), "output": str(out),
               "executor": runner.name if runner else None,
               "wall_s": round(time.perf_counter() - t0, 2),
               "computed": [d["cell"] for d in computed],
               "cached": [c["cell"] for c in cells if c["key"] in cached],
               "cells": [{k: d.get(k) for k in ("cell", "key", "model", "recipe", "profile",
                                                 "status", "error", "size_mb", "perplexity",
                                                 "ppl_increase_pct", "decode_tokens_per_s",
                                                 "ttft_ms", "artifact")} for d in every],
               "pareto": pareto(every, config.pick.max_ppl_increase)}
    write_atomic(out / "sweep.json", summary)
    return summary


def _bench_on_fleet(config, base, runner, computed, todo, say, on_cell) -> None:
    from slmedge.runtimes.bench.fleet import load_fleet

    fleet_path = str(base / config.fleet)
    fleet = load_fleet(fleet_path)
    ok = [d for d in computed if d["status"] == "complete"]
    arts = [d["artifact"] for d in ok]
    say(f"benching {len(arts)} artifact(s) on {len(fleet.devices)} device(s)")
    merged = runner.fleet(fleet_path, [d.name for d in fleet.devices], arts, config.bench)
    results = [r for m in merged for r in m["results"]]
    errors = [e for m in merged for e in m["errors"]]
    by_file = {c["key"]: c["cell_file"] for c in todo}
    for d in ok:
        name = Path(d["artifact"]).resolve().name
        mine = [r for r in results if r.get("label") == name]
        d["benches"] = {r["device"]: r for r in mine}
        d["errors"] = [e for e in errors if e["artifact"] == d["artifact"]]
        speeds = [r["decode_tokens_per_s"] for r in mine if r.get("decode_tokens_per_s")]
        d["decode_tokens_per_s"] = min(speeds) if speeds else None  # the slowest device
        ttfts = [r["ttft_ms"] for r in mine if r.get("ttft_ms")]
        d["ttft_ms"] = max(ttfts) if ttfts else None
        if d["errors"] and not mine:
            d["status"], d["error"] = "failed", "; ".join(e["message"] for e in d["errors"])
        write_atomic(Path(by_file[d["key"]]), d)
        if on_cell:
            on_cell(d)
