"""The results store: every bench result, quality card and sweep cell the CLI writes, in SQLite.

Where: ``--store PATH``, else ``$SLMEDGE_RESULTS``, else ``~/.cache/slmedge/results.sqlite``
(:func:`default_path`). ``--no-store`` writes nothing. Only the standard library's
``sqlite3`` (no server, one file, safe for several processes: WAL journal, busy timeout).

Schema (version 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- schema_version = 1
    results(
      id              INTEGER PRIMARY KEY,
      kind            TEXT NOT NULL,  -- bench | quality | sweep-cell | fleet-error
      stored_at       TEXT NOT NULL,  -- UTC ISO 8601, when it was written here
      measured_at     TEXT,           -- the document's own time (bench started_at, ...)
      model           TEXT,           -- source model (manifest source location, else family)
      recipe          TEXT,           -- quantization label or dtype (int4, fp32, ...)
      profile         TEXT,           -- device profile the artifact / bench used
      device          TEXT,           -- fleet device name, else the target (local, ssh://..)
      target          TEXT,           -- local | ssh://user@host:port | adb://SERIAL
      label           TEXT,           -- the run's label
      artifact        TEXT,           -- artifact path as given
      status          TEXT,           -- complete | partial | failed | ok
      decode_tokens_per_s REAL,       -- headline figures, copied out for queries:
      ttft_ms         REAL,
      peak_rss_mb     REAL,
      model_size_mb   REAL,
      perplexity      REAL,
      slmedge_version TEXT,
      doc             TEXT NOT NULL,  -- the whole JSON document, as written by the CLI
      doc_sha256      TEXT NOT NULL UNIQUE  -- the same document stored twice is one row
    )
    indexes on (model), (recipe), (device), (measured_at)

``doc`` is the source of truth: the columns are copied out of it on insert so queries can
filter without JSON functions; :func:`ResultsStore.query` returns the documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from slmedge.runtimes.errors import UsageError

STORE_SCHEMA_VERSION = 1
ENV_VAR = "SLMEDGE_RESULTS"
KINDS = ("bench", "quality", "sweep-cell", "fleet-error")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS results(
  id INTEGER PRIMARY KEY,
  kind TEXT NOT NULL,
  stored_at TEXT NOT NULL,
  measured_at TEXT,
  model TEXT, recipe TEXT, profile TEXT, device TEXT, target TEXT, label TEXT, artifact TEXT,
  status TEXT,
  decode_tokens_per_s REAL, ttft_ms REAL, peak_rss_mb REAL, model_size_mb REAL, perplexity REAL,
  slmedge_version TEXT,
  doc TEXT NOT NULL,
  doc_sha256 TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS results_model ON results(model);
CREATE INDEX IF NOT EXISTS results_recipe ON results(recipe);
CREATE INDEX IF NOT EXISTS results_device ON results(device);
CREATE INDEX IF NOT EXISTS results_measured ON results(measured_at);
"""
_COLUMNS = ("kind", "stored_at", "measured_at", "model", "recipe", "profile", "device", "target",
            "label", "artifact", "status", "decode_tokens_per_s", "ttft_ms", "peak_rss_mb",
            "model_size_mb", "perplexity", "slmedge_version", "doc", "doc_sha256")


def default_path() -> Path:
    """``$SLMEDGE_RESULTS`` or ``~/.cache/slmedge/results.sqlite`` (XDG_CACHE_HOME honoured)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "slmedge" / "results.sqlite"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("slmedge")
    except Exception:  # noqa: BLE001 - not installed (a copied runtime on a Pi): no version
        return None


def recipe_label(recipe: dict | None) -> str | None:
    """``int4`` / ``int8-static`` / ``fp32``: the quantization label, else the dtype."""
    if not recipe:
        return None
    quant = recipe.get("quant")
    if isinstance(quant, dict):
        quant = quant.get("label") or quant.get("scheme") or quant.get("name")
    return str(quant or recipe.get("dtype") or "") or None


def model_name(manifest_or_model: dict | None) -> str | None:
    """The source model's name: the last part of the manifest's source location."""
    if not manifest_or_model:
        return None
    source = manifest_or_model.get("source")
    if isinstance(source, dict) and source.get("location"):
        return str(source["location"]).rstrip("/").split("/")[-1] or None
    return manifest_or_model.get("family") or None


@dataclass
class Row:
    """One stored document with its columns."""

    id: int
    kind: str
    stored_at: str
    measured_at: str | None
    model: str | None
    recipe: str | None
    profile: str | None
    device: str | None
    target: str | None
    label: str | None
    artifact: str | None
    status: str | None
    decode_tokens_per_s: float | None
    ttft_ms: float | None
    peak_rss_mb: float | None
    model_size_mb: float | None
    perplexity: float | None
    slmedge_version: str | None
    doc: dict

    def summary(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "doc"}
        return d


class ResultsStore:
    """A SQLite file of results. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
            found = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if found is None:
                self.db.execute("INSERT INTO meta VALUES('schema_version', ?)",
                                (str(STORE_SCHEMA_VERSION),))
                self.db.commit()
            elif int(found[0]) != STORE_SCHEMA_VERSION:
                raise UsageError(f"results store {self.path}: schema version {found[0]}, this "
                                 f"slmedge reads version {STORE_SCHEMA_VERSION}; use another "
                                 "--store file")
        except sqlite3.DatabaseError as e:
            raise UsageError(f"results store {self.path}: not usable as an SQLite database "
                             f"({e}); name another with --store PATH or --no-store") from None
        except OSError as e:
            raise UsageError(f"results store {self.path}: cannot create it ({e.strerror}); "
                             "name another with --store PATH or --no-store") from None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    # -- writing --------------------------------------------------------------------------

    def add(self, kind: str, doc: dict, **columns) -> int | None:
        """Store ``doc``; columns not given are taken from the document. Returns the row id
        (None when this exact document was stored before)."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}; known: {', '.join(KINDS)}")
        text = json.dumps(doc, sort_keys=True, default=str)
        row = {**_columns_of(kind, doc), **{k: v for k, v in columns.items() if v is not None}}
        row.update(kind=kind, stored_at=_now(), doc=text,
                   doc_sha256=hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest())
        row.setdefault("slmedge_version", _version())
        values = [_scalar(row.get(c)) for c in _COLUMNS]
        cur = self.db.execute(
            f"INSERT OR IGNORE INTO results({','.join(_COLUMNS)}) "
            f"VALUES({','.join('?' * len(_COLUMNS))})", values)
        self.db.commit()
        return cur.lastrowid if cur.rowcount else None

    def add_bench(self, result: dict, manifest: dict | None = None, **columns) -> int | None:
        """A bench result (``bench_schema.BenchResult``), with the artifact's manifest when
        it is at hand (for the source model's name)."""
        if manifest:
            columns.setdefault("model", model_name(manifest))
        return self.add("bench", result, **columns)

    def add_quality(self, manifest: dict, artifact: str | None = None, **columns) -> int | None:
        """The quality card of an artifact's manifest (export / quantize)."""
        doc = {"kind": "slmedge.quality", "artifact": artifact,
               "created_at": manifest.get("created_at"), "source": manifest.get("source"),
               "recipe": manifest.get("recipe"), "profile": manifest.get("profile"),
               "quality": manifest.get("quality"), "versions": manifest.get("versions")}
        label = (manifest.get("quantization") or {}).get("label")
        if label:
            columns.setdefault("recipe", label)
        return self.add("quality", doc, artifact=artifact, **columns)

    def add_fleet(self, merged: dict) -> list[int | None]:
        """A fleet run: each device's results, and each failure as a ``fleet-error`` row."""
        ids = [self.add("bench", r) for r in merged.get("results", [])]
        ids += [self.add("fleet-error", dict(e, started_at=merged.get("started_at")),
                         device=e.get("device"), target=e.get("target"),
                         artifact=e.get("artifact"), status="failed",
                         measured_at=merged.get("started_at"))
                for e in merged.get("errors", [])]
        return ids

    # -- reading --------------------------------------------------------------------------

    def query(self, *, kind: str | None = None, model: str | None = None,
              recipe: str | None = None, device: str | None = None,
              profile: str | None = None, since: str | None = None,
              until: str | None = None, limit: int | None = None) -> list[Row]:
        """Rows matching every filter given, oldest first. ``model`` / ``recipe`` / ``device``
        match a substring (case-insensitive); ``since`` / ``until`` are ISO dates or times
        (``until`` a date includes that whole day), compared with ``measured_at``."""
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        for col, value in (("model", model), ("recipe", recipe), ("device", device),
                           ("profile", profile)):
            if value:
                where.append(f"LOWER(COALESCE({col}, '')) LIKE ?")
                args.append(f"%{value.lower()}%")
        if since:
            where.append("COALESCE(measured_at, stored_at) >= ?")
            args.append(_iso(since, "since"))
        if until:
            bound = _iso(until, "until")
            if len(until.strip()) == 10:  # a date: through the end of that day
                bound = bound[:10] + "T23:59:59.999999+00:00"
            where.append("COALESCE(measured_at, stored_at) <= ?")
            args.append(bound)
        sql = f"SELECT id,{','.join(_COLUMNS[:-1])} FROM results"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY COALESCE(measured_at, stored_at), id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        rows = []
        for rec in self.db.execute(sql, args):
            values = dict(zip(("id", *_COLUMNS[:-1]), rec, strict=True))
            values["doc"] = json.loads(values["doc"])
            rows.append(Row(**values))
        return rows

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def _iso(text: str, flag: str) -> str:
    """Normalise a date / time to UTC ISO 8601 (what ``measured_at`` holds)."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--{flag} {text!r}: not a date; use YYYY-MM-DD or "
                         "YYYY-MM-DDTHH:MM[:SS]") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat()


def _utc(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return _iso(text, "time")
    except UsageError:
        return text


def _scalar(value):
    """A column value SQLite takes: a profile export's manifest names its profile as a
    section (``{"name": ..., ...}``), which the column holds by name; other structures as
    JSON text."""
    if isinstance(value, dict):
        return value.get("name") if isinstance(value.get("name"), str) else \
            json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    return value


def _columns_of(kind: str, doc: dict) -> dict:
    """The queryable columns of a document of each kind."""
    if kind == "bench":
        model = doc.get("model") or {}
        quality = doc.get("quality") or {}
        return {"measured_at": _utc(doc.get("started_at")), "model": model_name(model),
                "recipe": recipe_label(model.get("recipe")), "profile": model.get("profile"),
                "device": doc.get("device") or doc.get("target"), "target": doc.get("target"),
                "label": doc.get("label"), "artifact": doc.get("artifact"),
                "status": doc.get("status"),
                "decode_tokens_per_s": doc.get("decode_tokens_per_s"),
                "ttft_ms": doc.get("ttft_ms"), "peak_rss_mb": doc.get("peak_rss_mb"),
                "model_size_mb": doc.get("model_size_mb"),
                "perplexity": quality.get("perplexity")}
    if kind == "quality":
        quality = doc.get("quality") or {}
        return {"measured_at": _utc(doc.get("created_at")), "model": model_name(doc),
                "recipe": recipe_label(doc.get("recipe")), "profile": doc.get("profile"),
                "label": Path(doc["artifact"]).name if doc.get("artifact") else None,
                "status": "ok", "perplexity": quality.get("perplexity")}
    if kind == "sweep-cell":
        bench = doc.get("bench") or {}
        return {"measured_at": _utc(doc.get("finished_at")), "model": doc.get("model"),
                "recipe": doc.get("recipe"), "profile": doc.get("profile"),
                "device": doc.get("device") or bench.get("target"),
                "target": bench.get("target"), "label": doc.get("cell"),
                "artifact": doc.get("artifact"), "status": doc.get("status"),
                "decode_tokens_per_s": doc.get("decode_tokens_per_s"),
                "ttft_ms": doc.get("ttft_ms"), "peak_rss_mb": bench.get("peak_rss_mb"),
                "model_size_mb": doc.get("size_mb"), "perplexity": doc.get("perplexity")}
    return {"measured_at": _utc(doc.get("started_at"))}


def open_store(path: str | Path | None = None, enabled: bool = True) -> ResultsStore | None:
    """The store, or None with ``--no-store``."""
    return ResultsStore(path) if enabled else None


def store_many(store: ResultsStore | None, items: Iterable[tuple[str, dict]]) -> None:
    if store is None:
        return
    for kind, doc in items:
        store.add(kind, doc)
