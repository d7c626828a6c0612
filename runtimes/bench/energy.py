"""Energy per token where the target exposes a meter (no torch; stdlib only).

Three meters, tried in this order by :func:`find_meter`:

==================  ==================================================  ====================
method              what is read                                        kind
==================  ==================================================  ====================
``rapl``            ``/sys/class/powercap/intel-rapl:N/energy_uj`` of    cumulative energy
                    every package domain (``intel-rapl:N``, not the      counter, wraps at
                    sub-domains ``intel-rapl:N:M``: they are inside      ``max_energy_range_uj``
                    the package), summed
``rpi5-pmic``       ``vcgencmd pmic_read_adc`` (Raspberry Pi 5): every   power (W), sampled
                    rail with both a current ``X_A`` and a voltage
                    ``X_V``, summed as I x V
``android-battery`` ``/sys/class/power_supply/battery/current_now``      power (W), sampled
                    (uA) x ``voltage_now`` (uV); ``status`` Charging or
                    Full is refused (the charger feeds the phone: the
                    battery current says nothing about the load)
==================  ==================================================  ====================

How a figure is made (:class:`EnergyProbe`): before the measured rounds the meter is read
for an idle baseline (``idle_w``); a thread samples it during the rounds; the bench records
each generation's prefill interval ``[t0, t0 + ttft]`` and decode interval ``[t0 + ttft,
t0 + ttft + sum(steps)]``. Power samples are integrated (trapezoids) into a cumulative energy
curve (a counter already is one), the energy of an interval is the curve's difference at
its ends (linear interpolation between samples), minus ``idle_w x duration``. Per round:
decode mJ / decoded token, prefill mJ / prompt token; the report gives the median over
rounds and an uncertainty: half the rounds' range, combined with the sampling error (mean
power x one sample period per interval end).

What is *not* measured: RAPL covers the CPU package (and DRAM where a ``dram`` domain is a
package sub-domain — not added, see above), not the board; the Pi 5 PMIC rails miss the 5 V
input stage (USB, fan, converter losses); a phone's fuel gauge averages over its own window
(often ~1 s) — benches shorter than a few seconds get a wide uncertainty.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
BATTERY = Path("/sys/class/power_supply/battery")
_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-+0-9.eE]+)[AV]\s*$")


class MeterUnavailable(Exception):
    """No meter, or one that must not be used now (charging); the message is the reason."""


# -- meters -----------------------------------------------------------------------------------


class RaplMeter:
    """Linux powercap (Intel / AMD RAPL): package energy counters, unwrapped."""

    method = "rapl"
    kind = "energy"
    period_s = 0.01

    def __init__(self, root: Path = POWERCAP):
        root = Path(root)
        if not root.is_dir():
            raise MeterUnavailable(f"no {root} (kernel without powercap, or not x86)")
        self.domains = sorted(p for p in root.glob("*:*") if re.fullmatch(r"[a-z-]+:\d+", p.name)
                              and (p / "energy_uj").exists())
        if not self.domains:
            raise MeterUnavailable(f"{root} has no package domain with energy_uj")
        self.max_uj = []
        self.last: list[int | None] = []
        for d in self.domains:
            try:
                self.max_uj.append(int((d / "max_energy_range_uj").read_text()))
                self.last.append(int((d / "energy_uj").read_text()))
            except PermissionError:
                raise MeterUnavailable(
                    f"{d / 'energy_uj'} is not readable by this user (since Linux 5.10 it is "
                    "root-only: run as root, or chmod a+r it)") from None
            except (OSError, ValueError) as e:
                raise MeterUnavailable(f"cannot read {d}: {e}") from None
        self.total_uj = 0
        self.wraps = 0
        self.source = ", ".join(f"{d}/energy_uj" for d in self.domains)

    def read(self) -> float:
        """Energy since this meter was opened, J (every counter unwrapped and summed)."""
        for i, d in enumerate(self.domains):
            now = int((d / "energy_uj").read_text())
            delta = now - self.last[i]
            if delta < 0:  # the counter passed max_energy_range_uj and restarted at 0
                delta += self.max_uj[i]
                self.wraps += 1
            self.total_uj += delta
            self.last[i] = now
        return self.total_uj / 1e6

    def refusal(self) -> str | None:
        return None


def parse_pmic(text: str) -> dict[str, tuple[float | None, float | None]]:
    """``vcgencmd pmic_read_adc`` -> rail -> (amps, volts)."""
    rails: dict[str, list[float | None]] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m:
            rail, unit, value = m.group(1), m.group(2), float(m.group(3))
            rails.setdefault(rail, [None, None])[0 if unit == "A" else 1] = value
    return {k: (v[0], v[1]) for k, v in rails.items()}


def pmic_watts(text: str) -> float:
    """Sum of I x V over the rails that report both (EXT5V and BATT report only a voltage)."""
    rails = parse_pmic(text)
    paired = [(a, v) for a, v in rails.values() if a is not None and v is not None]
    if not paired:
        raise MeterUnavailable("vcgencmd pmic_read_adc printed no rail with both a current and "
                               "a voltage (not a Raspberry Pi 5?)")
    return sum(a * v for a, v in paired)


class PmicMeter:
    """Raspberry Pi 5 PMIC rails through ``vcgencmd pmic_read_adc``."""

    method = "rpi5-pmic"
    kind = "power"
    period_s = 0.1  # one vcgencmd call takes ~10-30 ms on a Pi 5

    def __init__(self, run: Callable[[], str] | None = None):
        if run is None:
            exe = shutil.which("vcgencmd")
            if not exe:
                raise MeterUnavailable("no vcgencmd on PATH (not a Raspberry Pi)")

            def run() -> str:
                out = subprocess.run([exe, "pmic_read_adc"], capture_output=True, text=True,
                                     timeout=5)
                if out.returncode != 0:
                    raise MeterUnavailable(f"vcgencmd pmic_read_adc failed: "
                                           f"{(out.stderr or out.stdout).strip()[:200]}")
                return out.stdout
        self._run = run
        self.source = "vcgencmd pmic_read_adc"
        self.read()  # fail now, not in the sampling thread

    def read(self) -> float:
        return pmic_watts(self._run())

    def refusal(self) -> str | None:
        return None


class BatteryMeter:
    """Android (or any Linux) battery fuel gauge: |current_now| x voltage_now."""

    method = "android-battery"
    kind = "power"
    period_s = 0.05

    def __init__(self, root: Path = BATTERY):
        self.root = Path(root)
        if not (self.root / "current_now").exists() or not (self.root / "voltage_now").exists():
            raise MeterUnavailable(f"no {self.root}/current_now and voltage_now (no battery "
                                   "fuel gauge here)")
        self.source = f"{self.root}/current_now x voltage_now"
        self.read()

    def status(self) -> str:
        try:
            return (self.root / "status").read_text().strip()
        except OSError:
            return "Unknown"

    def read(self) -> float:
        try:
            ua = int((self.root / "current_now").read_text())
            uv = int((self.root / "voltage_now").read_text())
        except PermissionError:
            raise MeterUnavailable(f"{self.root}/current_now is not readable (SELinux on "
                                   "newer Android; run from adb shell)") from None
        # the sign convention differs between vendors (discharge positive or negative)
        return abs(ua) * uv / 1e12

    def refusal(self) -> str | None:
        status = self.status()
        if status in ("Charging", "Full"):
            return (f"battery status is {status}: the charger supplies the phone, so the "
                    "battery current does not measure the load; unplug it (or disable "
                    "charging) and bench again")
        return None


def find_meter(powercap: Path = POWERCAP, battery: Path = BATTERY,
               pmic_run: Callable[[], str] | None = None):
    """The first meter that works here, or raise :class:`MeterUnavailable` with every reason."""
    if os.environ.get("SLMEDGE_ENERGY", "1") == "0":
        raise MeterUnavailable("disabled by SLMEDGE_ENERGY=0")
    reasons = []
    for make in (lambda: RaplMeter(powercap), lambda: PmicMeter(pmic_run),
                 lambda: BatteryMeter(battery)):
        try:
            return make()
        except MeterUnavailable as e:
            reasons.append(str(e))
    raise MeterUnavailable("no energy meter: " + "; ".join(reasons))


# -- sampling and figures ---------------------------------------------------------------------


class Curve:
    """Cumulative energy (J) over time, from counter readings or integrated power samples."""

    def __init__(self, kind: str):
        self.kind = kind
        self.t: list[float] = []
        self.e: list[float] = []
        self._last_w: float | None = None

    def add(self, t: float, value: float) -> None:
        if self.kind == "energy":
            self.t.append(t)
            self.e.append(value)
            return
        if not self.t:
            self.t.append(t)
            self.e.append(0.0)
        else:  # trapezoid between the previous power sample and this one
            self.e.append(self.e[-1] + (self._last_w + value) / 2 * (t - self.t[-1]))
            self.t.append(t)
        self._last_w = value

    def at(self, t: float) -> float:
        """Energy at ``t`` by linear interpolation (clamped to the sampled span)."""
        ts, es = self.t, self.e
        if t <= ts[0]:
            return es[0]
        if t >= ts[-1]:
            return es[-1]
        lo, hi = 0, len(ts) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ts[mid] <= t:
                lo = mid
            else:
                hi = mid
        f = (t - ts[lo]) / (ts[hi] - ts[lo]) if ts[hi] > ts[lo] else 0.0
        return es[lo] + f * (es[hi] - es[lo])

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)

    def mean_w(self) -> float | None:
        if len(self.t) < 2 or self.t[-1] <= self.t[0]:
            return None
        return (self.e[-1] - self.e[0]) / (self.t[-1] - self.t[0])


def per_token_figures(curve: Curve, intervals: list[dict], idle_w: float | None,
                      period_s: float) -> dict:
    """mJ per decode / prefill token (median over rounds) with their uncertainties.

    ``intervals``: ``{"round", "phase" ("prefill" | "decode"), "t0", "t1", "tokens"}``.
    """
    out: dict = {}
    for phase in ("prefill", "decode"):
        rounds: dict[int, list[float]] = {}
        sampling: dict[int, float] = {}
        for iv in intervals:
            if iv["phase"] != phase or iv["tokens"] < 1 or iv["t1"] <= iv["t0"]:
                continue
            joules = curve.between(iv["t0"], iv["t1"])
            if idle_w:
                joules -= idle_w * (iv["t1"] - iv["t0"])
            acc = rounds.setdefault(iv["round"], [0.0, 0])
            acc[0] += joules
            acc[1] += iv["tokens"]
            # each end of the interval is placed to within half a sample period: the
            # energy of that half period at the interval's power, at both ends
            p = joules / (iv["t1"] - iv["t0"]) + (idle_w or 0.0)
            sampling[iv["round"]] = sampling.get(iv["round"], 0.0) + p * period_s
        per_round = [j / n * 1000 for j, n in rounds.values() if n]
        if not per_round:
            out[f"{phase}_mj_per_token"] = None
            out[f"{phase}_uncertainty_mj"] = None
            continue
        median = statistics.median(per_round)
        half_range = (max(per_round) - min(per_round)) / 2
        tokens = {r: n for r, (_j, n) in rounds.items()}
        samp = statistics.median(sampling[r] / tokens[r] * 1000 for r in rounds)
        out[f"{phase}_mj_per_token"] = round(median, 4)
        out[f"{phase}_uncertainty_mj"] = round(math.hypot(half_range, samp), 4)
    return out


class EnergyProbe:
    """What ``run_bench`` uses: idle baseline, a sampling thread, per-token figures.

    Without a meter every method is a no-op and :meth:`finish` reports why.
    """

    def __init__(self, meter=None, reason: str | None = None, idle_s: float | None = None):
        self.meter = meter
        self.reason = reason
        self.curve = Curve(meter.kind) if meter else None
        self.intervals: list[dict] = []
        self.idle_w: float | None = None
        self.idle_s = idle_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    @classmethod
    def open(cls, **find_kwargs) -> EnergyProbe:
        try:
            meter = find_meter(**find_kwargs)
        except MeterUnavailable as e:
            return cls(None, str(e))
        refusal = meter.refusal()
        if refusal:
            return cls(None, f"{meter.method}: {refusal}")
        return cls(meter)

    def _sample(self) -> tuple[float, float]:
        return time.perf_counter(), self.meter.read()

    def idle_baseline(self) -> None:
        """Read the meter at rest for ``idle_s`` (longer for slow fuel gauges)."""
        if not self.meter:
            return
        seconds = self.idle_s if self.idle_s is not None else max(0.5, 10 * self.meter.period_s)
        idle = Curve(self.meter.kind)
        end = time.perf_counter() + seconds
        try:
            while True:
                idle.add(*self._sample())
                if time.perf_counter() >= end:
                    break
                time.sleep(self.meter.period_s)
        except (OSError, ValueError, MeterUnavailable, subprocess.SubprocessError) as e:
            self._fail(f"reading the idle baseline failed: {e}")
            return
        self.idle_w = idle.mean_w()

    def start(self) -> None:
        if not self.meter:
            return
        try:  # the first sample now, so the curve covers everything recorded after start()
            self.curve.add(*self._sample())
        except (OSError, ValueError, MeterUnavailable, subprocess.SubprocessError) as e:
            self._fail(f"sampling failed: {e}")
            return
        self._thread = threading.Thread(target=self._loop, name="energy-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.meter.period_s):
                self.curve.add(*self._sample())
            self.curve.add(*self._sample())  # close the last interval
        except (OSError, ValueError, MeterUnavailable, subprocess.SubprocessError) as e:
            self._fail(f"sampling failed: {e}")

    def _fail(self, why: str) -> None:
        self._error = f"{self.meter.method}: {why}"

    def record(self, round_index: int, prompt_tokens: int, t0: float, result) -> None:
        """One generation of a measured round (``result``: a ``GenerationResult``)."""
        if not self.meter:
            return
        t_first = t0 + result.ttft_s
        self.intervals.append({"round": round_index, "phase": "prefill", "t0": t0,
                               "t1": t_first, "tokens": prompt_tokens})
        if result.step_s:
            self.intervals.append({"round": round_index, "phase": "decode", "t0": t_first,
                                   "t1": t_first + sum(result.step_s),
                                   "tokens": len(result.step_s)})

    def finish(self) -> dict:
        """The ``energy`` block of the bench result (``bench_schema.EnergyReport``)."""
        if self._thread:
            self._stop.set()
            self._thread.join(timeout=10)
        if not self.meter:
            return {"available": False, "reason": self.reason}
        if self._error:
            return {"available": False, "reason": self._error, "method": self.meter.method,
                    "source": self.meter.source}
        refusal = self.meter.refusal()  # e.g. plugged in during the run
        if refusal:
            return {"available": False, "reason": f"{self.meter.method}: {refusal}",
                    "method": self.meter.method, "source": self.meter.source}
        curve = self.curve
        if len(curve.t) < 2:
            return {"available": False, "reason": "fewer than 2 meter samples during the rounds",
                    "method": self.meter.method, "source": self.meter.source}
        span = curve.t[-1] - curve.t[0]
        figures = per_token_figures(curve, self.intervals, self.idle_w, self.meter.period_s)
        decode = [iv for iv in self.intervals if iv["phase"] == "decode"]
        decode_s = sum(iv["t1"] - iv["t0"] for iv in decode)
        decode_w = (sum(curve.between(iv["t0"], iv["t1"]) for iv in decode) / decode_s
                    if decode_s > 0 else None)
        notes = ["idle baseline subtracted" if self.idle_w is not None else
                 "no idle baseline: gross figures"]
        if self.meter.method == "rapl":
            notes.append("CPU package domains only (not DRAM sub-domains, not the board)")
            if getattr(self.meter, "wraps", 0):
                notes.append(f"counter wrapped {self.meter.wraps} time(s) (unwrapped)")
        elif self.meter.method == "rpi5-pmic":
            notes.append("PMIC rails only: the 5 V input stage, USB and fan are not included")
        else:
            notes.append("fuel-gauge current is averaged by the gauge (often ~1 s): short "
                         "benches get a wide uncertainty")
        return {"available": True, "reason": None, "method": self.meter.method,
                "source": self.meter.source, "sample_hz": round(len(curve.t) / span, 2)
                if span > 0 else None, "samples": len(curve.t),
                "idle_w": None if self.idle_w is None else round(self.idle_w, 4),
                **figures, "decode_w": None if decode_w is None else round(decode_w, 4),
                "notes": notes}
