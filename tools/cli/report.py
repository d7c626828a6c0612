"""Tables, comparisons and reports of benchmark results (``slmedge compare`` / ``report``).

Input: validated bench results (``runtimes.bench.schema.BenchResult``). Output:

- :func:`bench_table`: a llama-bench style Markdown table (``pp128`` = prefill of 128
  tokens, ``tg127@d128`` = 127 decoded tokens after a 128-token context).
- :func:`compare_rows` / :func:`format_compare`: figures side by side, each as a ratio
  to the first result.
- :func:`render_html`: one self-contained page (inline SVG plots drawn here, inline CSS,
  no script, nothing fetched) and :func:`render_markdown` for pasting into a PR.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from datetime import datetime, timezone

from slmedge.runtimes.bench.schema import BenchResult

PALETTE = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2",
           "#97bbf5", "#9c6b4e", "#9498a0")
QUALITY_KEYS = ("perplexity", "top1_agreement_eval", "top1_agreement", "kl_mean")


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.2g}"
    return f"{x:,.{digits}f}"


def _params(n: int | None) -> str:
    if not n:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def variant_name(r: BenchResult) -> str:
    """The run's label, with its precision (``quant`` label, else ``dtype``) when not in it."""
    recipe = r.model.recipe or {}
    kind = recipe.get("quant") or recipe.get("dtype")
    name = f"{r.label} ({kind})" if kind and str(kind) not in r.label else r.label
    device = getattr(r, "device", None)  # fleet runs: one row per device
    return f"{name} @ {device}" if device else name


def _backend(r: BenchResult) -> str:
    env = r.environment
    if not env:
        return "-"
    return ",".join(p.replace("ExecutionProvider", "") for p in env.providers) or "-"


# -- llama-bench style table ------------------------------------------------------------------


def bench_table(results: list[BenchResult]) -> str:
    """Markdown table: model | size | params | backend | threads | test | t/s | ms | spread."""
    head = ["model", "size", "params", "backend", "threads", "test", "t/s", "ms", "spread"]
    rows = []
    for r in results:
        common = [variant_name(r), f"{r.model_size_mb:.2f} MB", _params(r.model.parameters),
                  _backend(r), str(r.config.threads or "auto")]
        for b in r.ttft:
            tps = b.prefill_tokens_per_s
            rows.append(common + [
                f"pp{b.prompt_tokens}",
                f"{_num(tps.median)} ({_num(tps.min)}-{_num(tps.max)})" if tps else "-",
                f"TTFT {_num(b.ttft_ms.median)}", f"{b.ttft_ms.spread:.1%}"])
        for d in r.decode:
            t = d.tokens_per_s
            rows.append(common + [
                f"tg{d.tokens}@d{d.depth}", f"{_num(t.median)} ({_num(t.min)}-{_num(t.max)})",
                f"p50 {_num(d.ms_p50)} / p99 {_num(d.ms_p99)}", f"{t.spread:.1%}"])
    align = ["---", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---:"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def memory_table(results: list[BenchResult]) -> str:
    head = "| model | load s | RSS after load MB | peak RSS MB | model size MB | status | stability |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        lines.append(
            f"| {variant_name(r)} | {_num(r.load_s, 3)} | {_num(r.memory.rss_after_load_mb, 1)} | "
            f"{_num(r.memory.peak_rss_mb, 1)} | {_num(r.model_size_mb)} | {r.status} | "
            f"{r.stability.verdict} |")
    return "\n".join(lines)


# -- comparison -------------------------------------------------------------------------------


@dataclass
class CompareRow:
    metric: str
    unit: str
    better: str  # "higher" | "lower"
    values: list[float | None]
    unstable: list[bool]

    def ratios(self) -> list[float | None]:
        base = self.values[0]
        return [None if v is None or not base else v / base for v in self.values]


def compare_rows(results: list[BenchResult]) -> list[CompareRow]:
    """Every figure the results share (or some have), in a fixed order."""
    rows: list[CompareRow] = []

    def add(metric, unit, better, getter, unstable_key=None):
        values = [getter(r) for r in results]
        if all(v is None for v in values):
            return
        flags = [unstable_key in r.stability.unstable if unstable_key else False for r in results]
        rows.append(CompareRow(metric, unit, better, values, flags))

    add("load", "s", "lower", lambda r: r.load_s)
    add("model size", "MB", "lower", lambda r: r.model_size_mb)
    add("RSS after load", "MB", "lower", lambda r: r.memory.rss_after_load_mb)
    add("peak RSS", "MB", "lower", lambda r: r.memory.peak_rss_mb)

    def joules(r, key):  # runtimes/bench/energy.py's block, where the target had a meter
        e = getattr(r, "energy", None)
        return getattr(e, key) if e is not None and e.available else None

    add("energy / decode token", "mJ", "lower", lambda r: joules(r, "decode_mj_per_token"))
    add("energy / prompt token", "mJ", "lower", lambda r: joules(r, "prefill_mj_per_token"))
    buckets = sorted({b.prompt_tokens for r in results for b in r.ttft})
    depths = sorted({d.depth for r in results for d in r.decode})

    def bucket(r, n):
        return next((b for b in r.ttft if b.prompt_tokens == n), None)

    def depth(r, n):
        return next((d for d in r.decode if d.depth == n), None)

    for n in buckets:
        add(f"TTFT @{n}", "ms", "lower",
            lambda r, n=n: (b := bucket(r, n)) and b.ttft_ms.median, f"ttft_ms@{n}")
        add(f"prefill @{n}", "tok/s", "higher",
            lambda r, n=n: (b := bucket(r, n)) and b.prefill_tokens_per_s
            and b.prefill_tokens_per_s.median, f"ttft_ms@{n}")
    for n in depths:
        add(f"decode @d{n}", "tok/s", "higher",
            lambda r, n=n: (d := depth(r, n)) and d.tokens_per_s.median,
            f"decode_tokens_per_s@{n}")
        add(f"decode p50 @d{n}", "ms", "lower", lambda r, n=n: (d := depth(r, n)) and d.ms_p50)
        add(f"decode p99 @d{n}", "ms", "lower", lambda r, n=n: (d := depth(r, n)) and d.ms_p99)
    return rows


def environment_notes(results: list[BenchResult]) -> list[str]:
    """Why two results may not be comparable: different CPU, threads, runtime, partial runs."""
    notes = []
    for field, get in (("CPU", lambda e: e.cpu), ("threads", lambda e: e.threads),
                       ("onnxruntime", lambda e: e.onnxruntime), ("OS/arch",
                                                                  lambda e: f"{e.os} {e.arch}")):
        seen = {str(get(r.environment)) for r in results if r.environment}
        if len(seen) > 1:
            notes.append(f"{field} differs between results: {', '.join(sorted(seen))}")
    for r in results:
        if r.status != "complete":
            notes.append(f"{r.label}: partial result ({r.error or r.phase})")
        if r.stability.verdict == "unstable":
            notes.append(f"{r.label}: unstable figures ({', '.join(r.stability.unstable)})")
    return notes


def format_compare(results: list[BenchResult], markdown: bool = False) -> str:
    """Figures side by side; each after the first with its ratio to the first (``1.25x``).
    ``~`` marks a figure whose run-to-run spread was too wide to trust."""
    names = [variant_name(r) for r in results]
    head = ["metric", "better"] + [names[0]] + [f"{n} (vs first)" for n in names[1:]]
    table = []
    for row in compare_rows(results):
        cells = [f"{row.metric} ({row.unit})", row.better]
        for i, (v, ratio) in enumerate(zip(row.values, row.ratios(), strict=True)):
            text = _num(v) + ("~" if row.unstable[i] else "")
            if i > 0 and ratio is not None:
                text += f"  {ratio:.2f}x"
            cells.append(text)
        table.append(cells)
    notes = environment_notes(results)
    if markdown:
        lines = ["| " + " | ".join(head) + " |",
                 "| " + " | ".join(["---", "---"] + ["---:"] * len(names)) + " |"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table]
        lines += [""] + [f"- {n}" for n in notes] if notes else []
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(row, widths, strict=True))).rstrip() for row in [head, *table]]
    out.insert(1, "  ".join("-" * w for w in widths))
    out += [f"note: {n}" for n in notes]
    out.append("~ = run-to-run spread above the limit; ratios are value / first result's value")
    return "\n".join(out)


def compare_document(results: list[BenchResult]) -> dict:
    """The comparison as JSON (``slmedge compare --json``)."""
    return {
        "results": [variant_name(r) for r in results],
        "rows": [{"metric": row.metric, "unit": row.unit, "better": row.better,
                  "values": row.values, "ratios": row.ratios(), "unstable": row.unstable}
                 for row in compare_rows(results)],
        "notes": environment_notes(results),
    }


# -- SVG plots --------------------------------------------------------------------------------


def _nice_ticks(hi: float, n: int = 5) -> list[float]:
    if hi <= 0 or not math.isfinite(hi):
        return [0.0, 1.0]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(hi / step)) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 or v == int(v) else f"{v:.3g}"


class _Svg:
    """A plot area with a linear y axis from 0 and a caller-placed x axis."""

    W, H, L, R, T, B = 640, 300, 64, 16, 16, 56

    def __init__(self, y_max: float, y_label: str):
        self.ticks = _nice_ticks(y_max)
        self.y_top = self.ticks[-1]
        self.parts: list[str] = []
        self.y_label = y_label

    @property
    def plot_w(self) -> float:
        return self.W - self.L - self.R

    def y(self, v: float) -> float:
        h = self.H - self.T - self.B
        return self.T + h - (v / self.y_top) * h if self.y_top else self.H - self.B

    def axes(self) -> None:
        for t in self.ticks:
            y = self.y(t)
            self.parts.append(f'<line class="grid" x1="{self.L}" x2="{self.W - self.R}" '
                              f'y1="{y:.1f}" y2="{y:.1f}"/>')
            self.parts.append(f'<text class="tick" x="{self.L - 6}" y="{y + 4:.1f}" '
                              f'text-anchor="end">{_tick_label(t)}</text>')
        self.parts.append(f'<line class="axis" x1="{self.L}" x2="{self.L}" y1="{self.T}" '
                          f'y2="{self.H - self.B}"/>')
        self.parts.append(f'<line class="axis" x1="{self.L}" x2="{self.W - self.R}" '
                          f'y1="{self.H - self.B}" y2="{self.H - self.B}"/>')
        cy = (self.T + self.H - self.B) / 2
        self.parts.append(f'<text class="label" x="14" y="{cy:.0f}" text-anchor="middle" '
                          f'transform="rotate(-90 14 {cy:.0f})">{html.escape(self.y_label)}</text>')

    def svg(self, title: str, legend: list[tuple[str, str]] = ()) -> str:
        items = []
        x = self.L
        for name, color in legend:
            items.append(f'<rect x="{x}" y="{self.H - 18}" width="10" height="10" fill="{color}"/>'
                         f'<text class="legend" x="{x + 14}" y="{self.H - 9}">'
                         f'{html.escape(name)}</text>')
            x += 24 + 7 * len(name)
        return (f'<svg class="chart" viewBox="0 0 {self.W} {self.H}" width="{self.W}" '
                f'height="{self.H}" role="img" aria-label="{html.escape(title)}">'
                f"<title>{html.escape(title)}</title>{''.join(self.parts)}{''.join(items)}</svg>")


def bar_chart(title: str, y_label: str, groups: list[str], series: list[str],
              values: list[list[tuple[float, float, float] | None]]) -> str:
    """Grouped bars: ``values[group][series] = (median, min, max)`` or None; whiskers min-max."""
    top = max((v[2] for row in values for v in row if v), default=1.0)
    s = _Svg(top, y_label)
    s.axes()
    gw = s.plot_w / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for gi, group in enumerate(groups):
        gx = s.L + gi * gw + gw * 0.1
        for si, name in enumerate(series):
            v = values[gi][si]
            if not v:
                continue
            med, lo, hi = v
            x, y0 = gx + si * bw, s.y(0)
            color = PALETTE[si % len(PALETTE)]
            s.parts.append(
                f'<rect class="bar" data-group="{html.escape(group)}" '
                f'data-series="{html.escape(name)}" data-value="{med:.6g}" x="{x + 1:.1f}" '
                f'y="{s.y(med):.1f}" width="{bw - 2:.1f}" height="{y0 - s.y(med):.1f}" '
                f'fill="{color}"><title>{html.escape(group)} / {html.escape(name)}: '
                f"{_num(med)} ({_num(lo)}-{_num(hi)})</title></rect>")
            if hi > lo:
                cx = x + bw / 2
                s.parts.append(f'<line class="whisker" x1="{cx:.1f}" x2="{cx:.1f}" '
                               f'y1="{s.y(lo):.1f}" y2="{s.y(hi):.1f}"/>')
        label = group if len(group) <= 22 else group[:21] + "…"
        s.parts.append(f'<text class="tick" x="{gx + gw * 0.4:.1f}" y="{s.H - s.B + 16}" '
                       f'text-anchor="middle">{html.escape(label)}</text>')
    legend = [(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(series)]
    return s.svg(title, legend)


def line_chart(title: str, x_label: str, y_label: str,
               lines: list[tuple[str, list[tuple[float, float, float, float]]]],
               scatter: bool = False) -> str:
    """Lines (or points only) ``(name, [(x, y, y_min, y_max), ...])``; x axis linear from 0."""
    pts = [p for _, ps in lines for p in ps]
    s = _Svg(max((p[3] for p in pts), default=1.0), y_label)
    s.axes()
    xticks = _nice_ticks(max((p[0] for p in pts), default=1.0))
    x_top = xticks[-1] or 1.0

    def x(v):
        return s.L + v / x_top * s.plot_w

    for t in xticks:
        s.parts.append(f'<text class="tick" x="{x(t):.1f}" y="{s.H - s.B + 16}" '
                       f'text-anchor="middle">{_tick_label(t)}</text>')
    s.parts.append(f'<text class="label" x="{s.L + s.plot_w / 2:.0f}" y="{s.H - s.B + 32}" '
                   f'text-anchor="middle">{html.escape(x_label)}</text>')
    for i, (name, ps) in enumerate(lines):
        color = PALETTE[i % len(PALETTE)]
        ps = sorted(ps)
        if len(ps) > 1 and not scatter:
            path = " ".join(f"{'M' if j == 0 else 'L'}{x(p[0]):.1f},{s.y(p[1]):.1f}"
                            for j, p in enumerate(ps))
            s.parts.append(f'<path class="series" d="{path}" stroke="{color}" fill="none" '
                           f'data-series="{html.escape(name)}"/>')
        for p in ps:
            if p[3] > p[2]:
                s.parts.append(f'<line class="whisker" x1="{x(p[0]):.1f}" x2="{x(p[0]):.1f}" '
                               f'y1="{s.y(p[2]):.1f}" y2="{s.y(p[3]):.1f}"/>')
            s.parts.append(f'<circle class="point" cx="{x(p[0]):.1f}" cy="{s.y(p[1]):.1f}" r="4" '
                           f'fill="{color}" data-series="{html.escape(name)}"><title>'
                           f"{html.escape(name)}: {_num(p[0])}, {_num(p[1])}</title></circle>")
    return s.svg(title, [(n, PALETTE[i % len(PALETTE)]) for i, (n, _) in enumerate(lines)])


# -- report -----------------------------------------------------------------------------------


def quality_figure(r: BenchResult) -> tuple[str, float] | None:
    """The first numeric quality figure in the result's quality card (perplexity, ...)."""
    card = r.quality or {}
    for key in QUALITY_KEYS:
        for scope in (card, *[v for v in card.values() if isinstance(v, dict)]):
            v = scope.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return key, float(v)
    return None


def plots(results: list[BenchResult]) -> dict[str, str]:
    """Plot id -> SVG. Quality vs size only when some result carries a quality figure."""
    names = [variant_name(r) for r in results]
    out = {}
    depths = sorted({d.depth for r in results for d in r.decode})
    vals = [[(lambda d: d and (d.tokens_per_s.median, d.tokens_per_s.min, d.tokens_per_s.max))(
        next((d for d in r.decode if d.depth == n), None)) for n in depths] for r in results]
    out["decode-speed"] = bar_chart("Decode speed per variant", "decode tok/s", names,
                                    [f"depth {n}" for n in depths], vals)
    lines = [(name, [(b.prompt_tokens, b.ttft_ms.median, b.ttft_ms.min, b.ttft_ms.max)
                     for b in r.ttft]) for name, r in zip(names, results, strict=True)]
    out["ttft"] = line_chart("TTFT vs prompt length", "prompt tokens", "TTFT ms", lines)
    mem = [[(v, v, v) if v is not None else None for v in
            (r.model_size_mb, r.memory.rss_after_load_mb, r.memory.peak_rss_mb)] for r in results]
    out["memory"] = bar_chart("Memory", "MB", names,
                              ["model size", "RSS after load", "peak RSS"], mem)
    quality = [(name, r.model_size_mb, q) for name, r in zip(names, results, strict=True)
               if (q := quality_figure(r))]
    if quality:
        key = quality[0][2][0]
        pts = [(name, [(size, q[1], q[1], q[1])]) for name, size, q in quality if q[0] == key]
        out["quality-size"] = line_chart(f"{key} vs model size", "model size MB", key, pts,
                                         scatter=True)
    return out


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1340px;color:#1d1d1f;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f4f4f6}.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #e3e3e8;border-radius:6px;padding:6px}
figcaption{font-weight:600;margin:2px 4px 6px}
svg .grid{stroke:#eee}svg .axis{stroke:#888}svg .whisker{stroke:#333;stroke-width:1.5}
svg .series{stroke-width:2}svg text{font-size:11px;fill:#333}svg .label{font-size:12px}
.warn{color:#9a3412}.ok{color:#166534}code{background:#f4f4f6;padding:0 3px}
"""


def _md_to_html_table(md: str) -> str:
    rows = [ln.strip().strip("|").split("|") for ln in md.splitlines() if ln.startswith("|")]
    if len(rows) < 2:
        return ""
    head, body = rows[0], rows[2:]
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>"
                  for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _environment_table(results: list[BenchResult]) -> str:
    head = ("run", "target", "CPU", "cores", "threads", "OS / arch", "Python", "ORT",
            "providers", "governor", "temp start/end C")
    rows = []
    for r in results:
        e = r.environment
        if e is None:
            rows.append((r.label, r.target) + ("-",) * (len(head) - 2))
            continue

        def temp(snap):
            return max(snap.temperature_c.values()) if snap and snap.temperature_c else None

        rows.append((variant_name(r), r.target, e.cpu, f"{e.cores.logical}/{e.cores.physical}",
                     str(e.threads), f"{e.os} {e.arch}", e.python, e.onnxruntime,
                     ", ".join(e.providers), ", ".join(e.governor) or "-",
                     f"{_num(temp(e.at_start), 1)} / {_num(temp(e.at_end), 1)}"))
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                  for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def render_html(results: list[BenchResult], title: str = "slmedge benchmark report",
                failures: list[str] | None = None) -> str:
    """One self-contained HTML page: plots (inline SVG), tables, environment, warnings
    (``failures``: e.g. fleet devices that gave no result, listed first)."""
    figs = plots(results)
    captions = {"decode-speed": "Decode tok/s per variant (bars: median, whiskers: min-max)",
                "ttft": "Time to first token vs prompt length (median, min-max)",
                "memory": "Model size and process memory (MB)",
                "quality-size": "Quality vs model size"}
    fig_html = "".join(f'<figure class="plot" data-plot="{pid}"><figcaption>{captions[pid]}'
                       f"</figcaption>{svg}</figure>" for pid, svg in figs.items())
    if "quality-size" not in figs:
        fig_html += ('<p class="note">No quality figures in these results (the artifacts\' '
                     "manifests carry no quality card), so no quality vs size plot.</p>")
    warnings = [f"failed: {f}" for f in failures or []]
    warnings += [f"{r.label}: {w}" for r in results for w in r.warnings]
    warnings += environment_notes(results)
    warn_html = ("<ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>' for w in warnings)
                 + "</ul>") if warnings else '<p class="ok">No warnings.</p>'
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(results)} result(s), generated {generated}. "
        "Figures are medians over the measured rounds; ratios are to the first result.</p>"
        f'<h2>Plots</h2><div class="plots">{fig_html}</div>'
        f'<h2>Speed (llama-bench style)</h2>{_md_to_html_table(bench_table(results))}'
        f"<h2>Memory and load</h2>{_md_to_html_table(memory_table(results))}"
        f"<h2>Comparison</h2>{_md_to_html_table(format_compare(results, markdown=True))}"
        f"<h2>Environment</h2>{_environment_table(results)}"
        f"<h2>Warnings</h2>{warn_html}</body></html>\n"
    )


def render_markdown(results: list[BenchResult], title: str = "slmedge benchmark report",
                    failures: list[str] | None = None) -> str:
    """The report's tables in Markdown, for a PR description."""
    parts = [f"### {title}", "", bench_table(results), "", memory_table(results), ""]
    parts += [f"- **failed**: {f}" for f in failures or []]
    if len(results) > 1:
        parts += ["Ratios to the first result:", "", format_compare(results, markdown=True), ""]
    for r in results:
        e = r.environment
        if e:
            parts.append(f"- **{variant_name(r)}** on {r.target}: {e.cpu}, {e.threads} threads, "
                         f"{e.os} {e.arch}, Python {e.python}, onnxruntime {e.onnxruntime}, "
                         f"{', '.join(e.providers)}; stability {r.stability.verdict}")
        parts += [f"  - warning: {w}" for w in r.warnings]
    return "\n".join(parts).rstrip() + "\n"
