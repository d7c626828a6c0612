"""``slmedge check ARTIFACT --target ssh://...``: replay the artifact's quality card where it
will run and compare it with the card recorded at export time (thin: flags -> library)."""

from __future__ import annotations

import json
import sys

import numpy as np

from slmedge.runtimes.errors import EXIT_OK, EXIT_QUALITY_GATE

DEFAULT_GATE = 5.0  # percent; QualityConfig's default, for artifacts that record none (fp32)


def _kl_mean(ref_rows, cand_rows) -> tuple[float, float]:
    """Mean and max KL(reference || target) over positions, from log-softmax rows."""
    kls = []
    for lp, lq in zip(ref_rows, cand_rows):
        lp = np.asarray(lp, dtype=np.float64)
        lq = np.asarray(lq, dtype=np.float64)
        kls.append(max(float((np.exp(lp) * (lp - lq)).sum()), 0.0))
    return (float(np.mean(kls)), float(np.max(kls))) if kls else (0.0, 0.0)


def cmd_check_target(args) -> int:
    from slmedge.runtimes.artifact import open_artifact
    from slmedge.runtimes.check.remote_card import manifest_spec, recorded_replay, run_remote_card
    from slmedge.runtimes.sessions.static_decoder import open_decoder
    from slmedge.runtimes.check.target_card import compare, teacher_forced

    from .progress import Progress

    recorded, gate = recorded_replay(args.artifact)
    gate = DEFAULT_GATE if gate is None else gate
    spec = manifest_spec(args.artifact, logprobs=True)
    progress = Progress()
    try:
        measured = run_remote_card(args.target, args.artifact, spec, progress=progress.say)
    finally:
        progress.close()
    report = compare(recorded, measured, max_ppl_increase=gate)
    rows = (measured.get("teacher_forced") or {}).pop("logprobs", None)
    if rows:
        # KL against this machine's next-token distributions along the recorded tokens
        here = teacher_forced(open_decoder(open_artifact(args.artifact)), spec["prompt_ids"],
                              spec["reference_tokens"], keep_logprobs=True)
        report["kl_mean"], report["kl_max"] = _kl_mean(here["logprobs"], rows)
    doc = {"target": measured.get("target"), "platform": measured.get("platform"),
           "recorded_on": {"machine": recorded.get("machine"),
                           "onnxruntime": recorded.get("onnxruntime")},
           "prompt": recorded.get("prompt"), **report}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        plat = doc["platform"] or {}
        print(f"{doc['target']} ({plat.get('machine')}, onnxruntime {plat.get('onnxruntime')}) "
              f"vs the card recorded on {recorded.get('machine')}:")
        print(f"  greedy tokens of {recorded.get('prompt')!r}: "
              f"{'identical' if report['tokens_equal'] else 'differ'} "
              f"(same for {report['same_prefix']} of {len(report['recorded_tokens'])}; "
              f"teacher-forced agreement {report.get('greedy_agreement', 0):.1%}, first "
              f"divergence {report.get('first_divergence')})")
        if "perplexity" in report:
            print(f"  perplexity ({len(spec['window_ids'])} tokens): {report['perplexity']:.4f} "
                  f"vs {report['recorded_perplexity']:.4f} recorded ({report['ppl_diff_pct']:+.3f}%); "
                  f"vs the reference {report['ppl_increase_vs_reference_pct']:+.3f}% "
                  f"(gate +{gate:g}%: {'within' if report['within_gate'] else 'OUTSIDE'})")
        if "kl_mean" in report:
            print(f"  KL(here || target) of next-token distributions: mean {report['kl_mean']:.2e}, "
                  f"max {report['kl_max']:.2e}")
    if args.strict and report.get("within_gate") is False:
        print(f"slmedge check: on {doc['target']} the perplexity is "
              f"{report['ppl_increase_vs_reference_pct']:+.2f}% from the reference, outside the "
              f"gate of +{gate:g}% (--strict)", file=sys.stderr)
        return EXIT_QUALITY_GATE
    return EXIT_OK
