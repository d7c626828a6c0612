"""Energy per token (runtimes/bench/energy.py): the three readers against the fixtures of
tests/fixtures/energy (written from the documented formats), the per-token arithmetic, the
probe inside a real bench, and a real RAPL reading where this machine has one."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmedge.runtimes.bench import energy
from slmedge.runtimes.bench.schema import EnergyReport, validate_result
from slmedge.runtimes.bench.energy import (
    BatteryMeter,
    Curve,
    EnergyProbe,
    MeterUnavailable,
    PmicMeter,
    RaplMeter,
    find_meter,
    parse_pmic,
    per_token_figures,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "energy"
NOWHERE = Path("/nonexistent/powercap")


def _no_pmic():
    raise MeterUnavailable("no vcgencmd in this test")


# -- RAPL -------------------------------------------------------------------------------------


def _rapl_tree(root: Path):
    """Build the fixture's powercap tree; return the readings and a writer for them."""
    domains, readings = [], []
    for line in (FIXTURES / "rapl_wrap.txt").read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0] == "domain":
            d = root / parts[1]
            d.mkdir(parents=True)
            (d / "name").write_text(parts[2] + "\n")
            (d / "max_energy_range_uj").write_text(parts[3] + "\n")
            domains.append(d)
        else:
            readings.append([int(x) for x in parts[2:]])

    def write(values):
        for d, v in zip(domains, values, strict=True):
            (d / "energy_uj").write_text(f"{v}\n")

    return readings, write


def test_rapl_sums_packages_only_and_unwraps_the_counter(tmp_path):
    readings, write = _rapl_tree(tmp_path)
    write(readings[0])
    meter = RaplMeter(tmp_path)
    assert [d.name for d in meter.domains] == ["intel-rapl:0", "intel-rapl:1"]  # no :0:0
    got = []
    for values in readings[1:]:
        write(values)
        got.append(meter.read())
    # package-0: +3 J, then +2 J across the wrap, then +3 J; package-1: +0.5 J each step
    assert got == pytest.approx([3.5, 6.0, 9.5])
    assert meter.wraps == 1


def test_rapl_unreadable_counter_is_a_reason(tmp_path, monkeypatch):
    readings, write = _rapl_tree(tmp_path)
    write(readings[0])
    real = Path.read_text

    def read_text(self, *a, **k):  # root-only energy_uj (Linux >= 5.10), even when run as root
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(MeterUnavailable, match="not readable by this user"):
        RaplMeter(tmp_path)


# -- Raspberry Pi 5 PMIC ----------------------------------------------------------------------


def test_pmic_sums_current_times_voltage_of_paired_rails():
    text = (FIXTURES / "vcgencmd_pmic_read_adc.txt").read_text()
    rails = parse_pmic(text)
    assert rails["EXT5V"] == (None, 5.1456) and rails["BATT"] == (None, 0.0)
    assert rails["VDD_CORE"] == (2.5, 0.88)
    expected = (0.00390372 * 3.740238 + 0.05562756 * 3.308775 + 0.1659281 * 1.799928
                + 0.020496 * 1.11196 + 0.0 + 0.1883458 * 1.105584 + 0.3201285 * 0.8002446
                + 2.5 * 0.88 + 0.00042732 * 3.311961 + 0.0004884 * 3.306203
                + 0.0040887 * 0.799611 + 0.02222688 * 5.148)
    meter = PmicMeter(run=lambda: text)
    assert meter.read() == pytest.approx(expected, rel=1e-9)
    assert 3.2 < expected < 3.4  # VDD_CORE's 2.2 W dominates, as under load on a Pi 5


def test_pmic_on_something_else_is_a_reason():
    with pytest.raises(MeterUnavailable, match="no rail with both a current and a voltage"):
        PmicMeter(run=lambda: "error=1 error_msg=\"Command not registered\"\n")


# -- Android battery --------------------------------------------------------------------------


def _battery_samples(name: str):
    rows = []
    for line in (FIXTURES / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            t, status, ua, uv = line.split()
            rows.append((float(t), status, int(ua), int(uv)))
    return rows


def _battery_dir(root: Path, status: str, ua: int, uv: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "status").write_text(status + "\n")
    (root / "current_now").write_text(f"{ua}\n")
    (root / "voltage_now").write_text(f"{uv}\n")
    return root


def test_android_battery_discharging_gives_mj_per_token_net_of_idle(tmp_path):
    samples = _battery_samples("android_battery_discharging.txt")
    curve = Curve("power")
    for t, status, ua, uv in samples:
        meter = BatteryMeter(_battery_dir(tmp_path / "bat", status, ua, uv))
        assert meter.refusal() is None
        curve.add(t, meter.read())  # |-625000 uA| x 4 V = 2.5 W
    idle = Curve("power")
    for t, _s, ua, uv in samples[:4]:  # t < 1: at rest
        idle.add(t, abs(ua) * uv / 1e12)
    assert idle.mean_w() == pytest.approx(0.5)
    intervals = [{"round": 0, "phase": "prefill", "t0": 1.0, "t1": 1.5, "tokens": 8},
                 {"round": 0, "phase": "decode", "t0": 1.5, "t1": 3.0, "tokens": 15}]
    figures = per_token_figures(curve, intervals, idle.mean_w(), period_s=0.25)
    # prefill: (2.5 - 0.5) W x 0.5 s / 8 tokens; decode: 2 W x 1.5 s / 15 tokens
    assert figures["prefill_mj_per_token"] == pytest.approx(125.0)
    assert figures["decode_mj_per_token"] == pytest.approx(200.0)
    # one round: the uncertainty is the sampling term, 2.5 W x 0.25 s per interval
    assert figures["decode_uncertainty_mj"] == pytest.approx(2.5 * 0.25 / 15 * 1000)


def test_charging_phone_is_refused_with_the_reason(tmp_path):
    (t, status, ua, uv) = _battery_samples("android_battery_charging.txt")[0]
    bat = _battery_dir(tmp_path / "bat", status, ua, uv)
    probe = EnergyProbe.open(powercap=NOWHERE, battery=bat, pmic_run=_no_pmic)
    report = probe.finish()
    assert report["available"] is False
    assert report["reason"].startswith("android-battery: battery status is Charging")
    assert "unplug it" in report["reason"]
    EnergyReport.model_validate(report)


def test_no_meter_says_why_for_each_source(tmp_path, monkeypatch):
    monkeypatch.setattr(energy.shutil, "which", lambda _name: None)
    probe = EnergyProbe.open(powercap=NOWHERE, battery=tmp_path / "none")
    report = probe.finish()
    assert report == {"available": False, "reason": report["reason"]}
    assert f"no {NOWHERE}" in report["reason"] and "no vcgencmd on PATH" in report["reason"]
    assert "no battery fuel gauge" in report["reason"]


def test_counter_curve_interpolates_between_samples():
    c = Curve("energy")
    for t, e in ((0.0, 0.0), (1.0, 10.0), (2.0, 30.0)):
        c.add(t, e)
    assert c.between(0.5, 1.5) == pytest.approx(15.0)  # 5 J + 10 J
    assert c.at(-1) == 0.0 and c.at(5) == 30.0


# -- inside a real bench ----------------------------------------------------------------------


class _SteadyMeter:
    """A stand-in power meter reading a steady 2 W: the idle baseline is then 2 W too, so
    every interval's net energy is 0 and the mean power over the decode intervals is 2 W —
    exact whatever the timing, as long as the intervals lie inside the sampled span."""

    method = "android-battery"
    kind = "power"
    period_s = 0.005
    source = "steady 2 W (test stand-in)"

    def read(self) -> float:
        return 2.0

    def refusal(self):
        return None


def test_bench_carries_the_energy_block(tiny_artifact, monkeypatch):
    from slmedge.runtimes.bench.runner import BenchConfig, run_bench
    from slmedge.tools.cli.report import compare_rows

    monkeypatch.setattr(energy, "find_meter", lambda **_k: _SteadyMeter())
    config = BenchConfig(prompt_tokens=16, new_tokens=24, warmup=1, repeats=2,
                         prompt_buckets=(16,), decode_depths=(16,), threads=1)
    r = validate_result(run_bench(tiny_artifact("llama"), config))
    e = r.energy
    assert e.available and e.method == "android-battery" and e.samples >= 2
    assert e.idle_w == pytest.approx(2.0) and e.decode_w == pytest.approx(2.0)
    assert e.decode_mj_per_token == pytest.approx(0.0, abs=1e-6)
    assert e.prefill_mj_per_token == pytest.approx(0.0, abs=1e-6)
    assert e.sample_hz > 0 and e.decode_uncertainty_mj > 0
    # compare / report show it
    rows = {row.metric: row for row in compare_rows([r, r])}
    assert rows["energy / decode token"].values == [e.decode_mj_per_token] * 2
    assert rows["energy / prompt token"].unit == "mJ"


def test_probe_attributes_prefill_and_decode_intervals():
    """EnergyProbe.finish on the discharging phone's samples (no thread, no clock): one
    generation whose prefill is [1.0, 1.5] s (8 tokens) and decode [1.5, 3.0] s (15 steps)."""
    from types import SimpleNamespace

    probe = EnergyProbe(_SteadyMeter())
    for t, _status, ua, uv in _battery_samples("android_battery_discharging.txt"):
        probe.curve.add(t, abs(ua) * uv / 1e12)
    probe.idle_w = 0.5
    probe.record(0, 8, 1.0, SimpleNamespace(ttft_s=0.5, step_s=[0.1] * 15))
    report = probe.finish()
    assert report["prefill_mj_per_token"] == pytest.approx(125.0)
    assert report["decode_mj_per_token"] == pytest.approx(200.0)
    assert report["decode_w"] == pytest.approx(2.5) and report["samples"] == 13
    assert "idle baseline subtracted" in report["notes"]
    EnergyReport.model_validate(report)


def test_bench_without_a_meter_says_why(tiny_artifact, monkeypatch):
    from slmedge.runtimes.bench.runner import BenchConfig, run_bench

    monkeypatch.setenv("SLMEDGE_ENERGY", "0")
    doc = run_bench(tiny_artifact("llama"), BenchConfig(
        prompt_tokens=8, new_tokens=4, warmup=0, repeats=1, prompt_buckets=(8,),
        decode_depths=(8,), threads=1))
    assert doc["energy"] == {"available": False, "reason": "disabled by SLMEDGE_ENERGY=0"}


# -- this machine -----------------------------------------------------------------------------


def test_real_rapl_reading_on_this_machine():
    try:
        meter = find_meter(pmic_run=_no_pmic, battery=Path("/nonexistent"))
    except MeterUnavailable as e:
        pytest.skip(f"no readable energy meter on this machine: {e}")
    if meter.method != "rapl":
        pytest.skip(f"this machine's meter is {meter.method}, not RAPL")
    first = meter.read()
    x = 0
    for i in range(2_000_000):  # some work, so the package counter moves
        x += i * i
    assert meter.read() > first
