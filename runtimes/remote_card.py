"""Replay an artifact's quality card on a target over ``ssh://`` / ``adb://`` (no torch).

Same transport, upload cache and Python environment as the remote benchmark
(:mod:`slmedge.runtimes.remote`); the command run there is
``python -m slmedge.runtimes.target_card ARTIFACT --spec-json - --json`` with the replay spec
on its stdin (token ids only: the target needs no tokenizer)::

    spec = manifest_spec(artifact)                    # recorded at export time on this machine
    measured = run_remote_card("ssh://pi@raspberrypi", artifact, spec)
    report = target_card.compare(recorded, measured, max_ppl_increase)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .artifact import open_artifact
from .errors import UsageError
from .remote import (
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
    gate = info.gate.max_ppl_increase_pct if getattr(info, "gate", None) else None
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


def run_remote_card(target_url: str, artifact: str | Path, spec: dict, *,
                    threads: int | None = None, progress: Say | None = None,
                    timeout: float = 3600) -> dict:
    """Run ``spec`` (see :func:`slmedge.runtimes.target_card.run_spec`) on the target; return
    its JSON (``platform``, ``tokens``, ``teacher_forced``, ``perplexity``) plus ``target``."""
    say = progress or (lambda _m: None)
    transport, plan, python = prepare_target(target_url, artifact, say)
    target = plan.target
    args = [python, "-m", "slmedge.runtimes.target_card", plan.artifact_dir,
            "--spec-json", "-", "--json"]
    if threads:
        args += ["--threads", str(threads)]
    command = (f"cd {q(target.root)} && PYTHONPATH={q(plan.lib_dir)} exec "
               + " ".join(q(a) for a in args))
    say(f"replaying the quality card on {target.describe()}")
    out = transport.run(command, timeout=timeout, input=json.dumps(spec).encode())
    stdout = out.stdout.decode(errors="replace")
    stderr = out.stderr.decode(errors="replace")
    docs = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not docs:
        raise RemoteError(f"the quality card on {target.describe()} failed (exit "
                          f"{out.returncode}): {_exception_line(stderr) or 'no output'}")
    result = json.loads(docs[-1])
    result["target"] = target.describe()
    return result
