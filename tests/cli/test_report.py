"""``slmedge compare`` and ``slmedge report``: ratios, Markdown, and an HTML page rendered in
headless Chromium (Debian ``chromium``) whose plots are checked after layout."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys

import pytest

from slmedge.runtimes.bench.runner import BenchConfig, run_bench
from slmedge.runtimes.bench.schema import validate_result
from slmedge.tools.cli.app import main

CFG = dict(prompt_tokens=16, new_tokens=6, warmup=0, repeats=2, prompt_buckets=(8, 32),
           decode_depths=(8, 64), depth_tokens=4)


@pytest.fixture(scope="module")
def runs(tiny_artifact, tmp_path_factory):
    """Three results: two thread counts, and one with a quality card and a quant recipe."""
    d = tmp_path_factory.mktemp("runs")
    art = tiny_artifact("llama")
    a = run_bench(art, BenchConfig(**CFG, threads=1, label="llama-t1"))
    b = run_bench(art, BenchConfig(**CFG, threads=2, label="llama-t2"))
    c = json.loads(json.dumps(b))
    c["label"] = "llama-int4"
    c["model"]["recipe"] = {"dtype": "fp32", "quant": "int4"}
    c["model_size_mb"] = round(b["model_size_mb"] / 4, 3)
    c["quality"] = {"perplexity": 131.5, "reference_perplexity": 128.0, "ppl_increase_pct": 2.7}
    paths = []
    for name, doc in (("a", a), ("b", b), ("c", c)):
        validate_result(doc)
        p = d / f"{name}.json"
        p.write_text(json.dumps(doc))
        paths.append(p)
    return paths


def test_compare_prints_ratios_to_the_first(runs, capsys):
    assert main(["compare", str(runs[0]), str(runs[1])]) == 0
    out = capsys.readouterr().out
    assert "llama-t1 (fp32)" in out and "llama-t2 (fp32) (vs first)" in out
    a, b = (json.loads(p.read_text()) for p in runs[:2])
    line = next(ln for ln in out.splitlines() if ln.startswith("decode @d8 (tok/s)"))
    va = next(d for d in a["decode"] if d["depth"] == 8)["tokens_per_s"]["median"]
    vb = next(d for d in b["decode"] if d["depth"] == 8)["tokens_per_s"]["median"]
    assert f"{vb / va:.2f}x" in line
    assert "note: threads differs between results: 1, 2" in out


def test_compare_json_and_labels(runs, capsys):
    assert main(["compare", f"one={runs[0]}", f"two={runs[2]}", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"] == ["one (fp32)", "two (int4)"]
    rows = {r["metric"]: r for r in doc["rows"]}
    assert set(rows) >= {"load", "model size", "peak RSS", "TTFT @8", "TTFT @32",
                         "prefill @16", "decode @d8", "decode p99 @d64"}
    size = rows["model size"]
    assert size["better"] == "lower" and size["ratios"][0] == 1.0
    assert size["ratios"][1] == pytest.approx(size["values"][1] / size["values"][0])


def test_compare_rejects_a_non_result(tmp_path, runs, capsys):
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"schema_version": 1, "ttft_ms": 3.0}))
    assert main(["compare", str(runs[0]), str(bad)]) == 2
    assert "schema version 1" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing.json")]) == 2


def test_markdown_report(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("### slmedge benchmark report")
    assert "| model | size | params | backend | threads | test | t/s | ms | spread |" in md
    assert "| llama-int4 |" in md and "| pp32 |" in md and "| tg4@d64 |" in md
    assert "Ratios to the first result:" in md
    out = tmp_path / "r.md"
    assert main(["report", str(runs[0]), "-o", str(out)]) == 0  # .md -> markdown
    assert out.read_text().startswith("### ")


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# Test-only: appended to a copy of the report, measures the laid-out plots for --dump-dom.
MEASURE = """<script>
const out = {};
for (const fig of document.querySelectorAll('figure.plot')) {
  const svg = fig.querySelector('svg'); const box = svg.getBoundingClientRect();
  const bars = [...svg.querySelectorAll('rect.bar')].map(r => r.getBBox().height);
  out[fig.dataset.plot] = {width: box.width, height: box.height, bars: bars,
    points: svg.querySelectorAll('circle.point').length,
    paths: svg.querySelectorAll('path.series').length};
}
const pre = document.createElement('pre');
pre.id = 'measure';
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def _chromium(*args, cwd, timeout=180):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail("chromium is missing: run tools/setup.sh (apt-get install chromium)")
    argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={cwd / 'chromium-profile'}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_html_report_is_self_contained_and_renders_its_plots(runs, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "-o", str(page), "--title", "tiny <runs>"]) == 0
    html = page.read_text()
    for remote in ("http://", "https://", "<script", "<link", "src=", "@import", "url("):
        assert remote not in html, remote  # nothing fetched, nothing executed
    assert "<title>tiny &lt;runs&gt;</title>" in html
    plots = re.findall(r'<figure class="plot" data-plot="([\w-]+)">', html)
    assert plots == ["decode-speed", "ttft", "memory", "quality-size"]

    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", MEASURE + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri(), cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    measured = json.loads(re.search(r'<pre id="measure">(.*?)</pre>', dom.stdout).group(1))
    assert set(measured) == set(plots)
    for name, m in measured.items():
        assert m["width"] > 300 and m["height"] > 150, (name, m)
    # 3 runs x 3 depths (8, 16, 64) bars; 3 runs x 3 memory figures; bars really drawn
    assert len(measured["decode-speed"]["bars"]) == 9
    assert len(measured["memory"]["bars"]) == 9
    assert all(h > 0 for h in measured["decode-speed"]["bars"])
    assert measured["ttft"]["paths"] == 3 and measured["ttft"]["points"] == 9  # 3 buckets each
    with_quality = [p for p in runs if json.loads(p.read_text())["quality"]]
    assert measured["quality-size"]["points"] == len(with_quality) >= 1

    shot = tmp_path / "report.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1100,1400", page.as_uri(),
                    cwd=tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert _png_size(shot) == (1100, 1400) and shot.stat().st_size > 30_000
    if "-s" in sys.argv:
        print(f"screenshot: {shot}")


def test_html_without_quality_says_so(runs, tmp_path):
    doc = json.loads(runs[0].read_text())
    doc["quality"] = None  # an artifact whose manifest has no quality card
    src = tmp_path / "no-quality.json"
    src.write_text(json.dumps(doc))
    page = tmp_path / "r.html"
    assert main(["report", str(src), "-o", str(page)]) == 0
    html = page.read_text()
    assert 'data-plot="quality-size"' not in html
    assert "No quality figures in these results" in html
