"""Replay an artifact's quality card on a target over ``ssh://`` / ``adb://`` (no torch).

Same transport, upload cache and Python environment as the remote benchmark
(:mod:`slmedge.runtimes.bench.remote`); the command run there is
``python -m slmedge.runtimes.check.target_card ARTIFACT --spec-json - --json`` with the replay spec
on its stdin (token ids only: the target needs no tokenizer)::

    spec = manifest_spec(artifact)                    # recorded at export time on this machine
    measured = run_remote_card("ssh://pi@raspberrypi", artifact, spec)
    report = target_card.compare(recorded, measured, max_ppl_increase)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from slmedge.runtimes.artifact import open_artifact
from slmedge.runtimes.errors import UsageError
from slmedge.runtimes.bench.remote import (
    AdbTransport,
    RemoteError,
    RemotePlan,
    Say,
    _ensure_python,
    _exception_line,
    _probe,
    artifact_files,
    make_transport,
    parse_target,
    q,
    runtime_files,
)


def recorded_replay(artifact: str | Path) -> tuple[dict, float | None]:
    """The manifest's ``quality.replay`` record and the quality gate (percent) it was held to."""
    info = open_artifact(artifact).info
    replay = info.quality.replay if info and info.quality else None
    if not replay:
        raise UsageError(f"{artifact}: the manifest's quality card has no replay record (exported "
                         "before slmedge recorded one); export or quantize it again")
    gate = info.gate.max_ppl_increase_pct if info.gate else None  # an artifact's or bundle's
    return replay.model_dump(mode="json", exclude_unset=True), gate


def manifest_spec(artifact: str | Path, logprobs: bool = False) -> dict:
    """The replay spec to run on a target: the recorded prompt, window, and tokens to check."""
    replay, _gate = recorded_replay(artifact)
    return {"prompt_ids": replay["prompt_ids"], "new_tokens": replay["new_tokens"],
            "window_ids": replay.get("window_ids", []), "reference_tokens": replay["tokens"],
            "logprobs": logprobs}


def prepare_target(target_url: str, artifact: str | Path, say: Say):
    """Connect, copy the artifact and the runtime code (cached), make or reuse the venv.
    Returns ``(transport, plan, python)``."""
    target = parse_target(target_url)
    art_key, art_files = artifact_files(artifact)
    lib_key, lib_files = runtime_files()
    name = Path(artifact).resolve().name
    plan = RemotePlan(target, artifact_dir=f"artifacts/{name}-{art_key}",
                      lib_dir=f"lib/{lib_key}", venv_dir="venv", result_file="")
    transport = make_transport(target)
    if isinstance(transport, AdbTransport):
        plan.target = target = replace(target, host=transport.serial)
    say(f"connecting to {target.describe()}")
    plan.facts = _probe(transport, plan)
    if plan.facts.get("artifact") != "ok":
        transport.upload(art_files, f"{target.root}/{plan.artifact_dir}", say)
    if plan.facts.get("lib") != "ok":
        transport.upload(lib_files, f"{target.root}/{plan.lib_dir}", say)
    return transport, plan, _ensure_python(transport, plan, say)


def _run_target_card(target_url: str, artifact: str | Path, extra: list[str], *,
                     stdin: bytes | None, what: str, progress: Say | None,
                     timeout: float) -> tuple[dict, RemotePlan]:
    """Run ``python -m slmedge.runtimes.check.target_card ARTIFACT EXTRA...`` on the target; its
    last JSON line, and the plan (where the artifact went there)."""
    say = progress or (lambda _m: None)
    transport, plan, python = prepare_target(target_url, artifact, say)
    target = plan.target
    args = [python, "-m", "slmedge.runtimes.check.target_card", plan.artifact_dir, *extra, "--json"]
    command = (f"cd {q(target.root)} && PYTHONPATH={q(plan.lib_dir)} exec "
               + " ".join(q(a) for a in args))
    say(f"{what} on {target.describe()}")
    out = transport.run(command, timeout=timeout, input=stdin)
    stdout = out.stdout.decode(errors="replace")
    stderr = out.stderr.decode(errors="replace")
    docs = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not docs:
        raise RemoteError(f"{what} on {target.describe()} failed (exit "
                          f"{out.returncode}): {_exception_line(stderr) or 'no output'}")
    result = json.loads(docs[-1])
    result["target"] = target.describe()
    return result, plan


def run_remote_card(target_url: str, artifact: str | Path, spec: dict, *,
                    threads: int | None = None, progress: Say | None = None,
                    timeout: float = 3600) -> dict:
    """Run ``spec`` (see :func:`slmedge.runtimes.check.target_card.run_spec`) on the target; return
    its JSON (``platform``, ``tokens``, ``teacher_forced``, ``perplexity``) plus ``target``."""
    extra = ["--spec-json", "-"] + (["--threads", str(threads)] if threads else [])
    result, _plan = _run_target_card(target_url, artifact, extra,
                                     stdin=json.dumps(spec).encode(),
                                     what="the quality card", progress=progress, timeout=timeout)
    return result


def run_remote_verify(target_url: str, bundle: str | Path, *, runtime_version: str | None = None,
                      threads: int | None = None, progress: Say | None = None,
                      timeout: float = 3600) -> dict:
    """``slmedge verify`` where the app will run: the manifest and the runtime-version check
    here (:func:`~slmedge.runtimes.check.verify.verify_bundle` without parity: they do not depend on
    the device), then, on the target, every file's hash and the parity replay (the bundle as
    copied there; the recorded tokens checked by the target's ONNX Runtime). Returns
    ``{"target", "platform", "report"}`` (``report``: ``VerifyReport.to_dict()``'s fields); a
    check that fails on the target raises the same error class here, its message naming the
    target and this machine's bundle path."""
    from slmedge.runtimes import errors
    from .ort_format import OrtFormatError
    from .verify import verify_bundle

    report = verify_bundle(bundle, runtime_version=runtime_version, parity=False).to_dict()
    extra = ["--verify-bundle"] + (["--threads", str(threads)] if threads else [])
    result, plan = _run_target_card(target_url, bundle, extra, stdin=None,
                                    what="slmedge verify", progress=progress, timeout=timeout)
    error = result.get("error")
    if error:
        known = {c.__name__: c for c in (errors.UsageError, errors.ArtifactError,
                                         errors.QualityGateFailed, errors.UnsupportedOp,
                                         OrtFormatError)}
        cls = known.get(error["class"], errors.SlmEdgeError)
        machine = (result.get("platform") or {}).get("machine")
        message = (f"on {result['target']} ({machine}): "
                   + error["message"].replace(plan.artifact_dir, str(bundle)))
        if cls is errors.QualityGateFailed:
            raise cls(message, figures=error.get("figures"))
        raise cls(message)
    report.update(files_checked=result["files_checked"], parity=result["parity"])
    return {"target": result["target"], "platform": result["platform"], "report": report}
