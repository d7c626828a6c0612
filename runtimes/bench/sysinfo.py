"""Where a benchmark ran: CPU, cores, OS, versions, governor, temperature (no torch).

Everything here is read-only and best effort: a fact the OS does not expose (no
``/sys/class/thermal`` in a container, no ``getprop`` off Android) is ``None`` or an
empty dict, never an exception. Runs on a Raspberry Pi, in Termux and on a desktop.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")
SYS_THERMAL = Path("/sys/class/thermal")

# /proc/cpuinfo keys that name the CPU, most specific first: x86 "model name", Raspberry Pi
# "Model" (board), older ARM kernels "Hardware" (SoC), and "CPU part" as a last resort.
_CPUINFO_KEYS = ("model name", "Model", "Hardware", "Processor", "CPU part")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cpu_model() -> str:
    """A human name for the CPU (or board): ``/proc/cpuinfo``, else ``platform``."""
    text = _read(Path("/proc/cpuinfo")) or ""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in _CPUINFO_KEYS and value.strip() and key not in found:
            found[key] = value.strip()
    for key in _CPUINFO_KEYS:
        if key in found:
            return found[key]
    return platform.processor() or platform.machine() or "unknown"


def cpu_cores() -> dict:
    """Logical CPUs, physical cores, and the CPUs this process may run on."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:  # psutil missing or unable to read topology (e.g. Android SELinux)
        physical = None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {"logical": os.cpu_count(), "physical": physical, "usable": usable}


def governors() -> dict[str, list[int]]:
    """CPU frequency governor -> the CPUs using it (Linux cpufreq; empty if not exposed)."""
    out: dict[str, list[int]] = {}
    for gov_file in sorted(SYS_CPU.glob("cpu[0-9]*/cpufreq/scaling_governor")):
        gov = _read(gov_file)
        if gov:
            out.setdefault(gov, []).append(int(gov_file.parent.parent.name[3:]))
    for cpus in out.values():
        cpus.sort()
    return out


def cpu_freq_mhz() -> dict[str, float]:
    """Current frequency per CPU in MHz (cpufreq ``scaling_cur_freq``; empty if not exposed)."""
    out = {}
    for f in sorted(SYS_CPU.glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        value = _read(f)
        if value and value.isdigit():
            out[f.parent.parent.name] = int(value) / 1000
    return out


def temperatures_c() -> dict[str, float]:
    """Thermal zone type -> temperature in degrees C (Linux sysfs; empty if not exposed)."""
    out: dict[str, float] = {}
    for zone in sorted(SYS_THERMAL.glob("thermal_zone*")):
        raw = _read(zone / "temp")
        if raw is None:
            continue
        try:
            milli = int(raw)
        except ValueError:
            continue
        name = _read(zone / "type") or zone.name
        if name in out:
            name = f"{name}-{zone.name}"
        # Most drivers report millidegrees; a few report degrees.
        out[name] = round(milli / 1000 if abs(milli) > 200 else float(milli), 1)
    return out


def android_properties() -> dict[str, str]:
    """Device model, SoC and Android release from ``getprop`` (empty off Android)."""
    if "ANDROID_ROOT" not in os.environ or not shutil.which("getprop"):
        return {}
    out = {}
    for key in ("ro.product.manufacturer", "ro.product.model", "ro.soc.model",
                "ro.board.platform", "ro.build.version.release"):
        try:
            value = subprocess.run(["getprop", key], capture_output=True, text=True,
                                   timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if value:
            out[key] = value
    return out


def package_version(*names: str) -> str | None:
    """The installed version of the first distribution found among ``names``, else ``None``."""
    from importlib import metadata  # email, zipfile, csv ...: ~2 MB resident, after the load

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def memory_total_mb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 1e6, 1)
    except Exception:  # psutil missing or /proc/meminfo unreadable
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def thermal_snapshot() -> dict:
    """What can drift during a run: temperatures, frequencies, load (taken at start and end)."""
    return {"temperature_c": temperatures_c(), "cpu_freq_mhz": cpu_freq_mhz(),
            "load_average": load_average()}


def environment(threads: int | None, providers: list[str],
                available_providers: list[str] | None = None) -> dict:
    """The environment record stored with every benchmark result (schema: ``Environment``)."""
    import onnxruntime as ort

    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores": cpu_cores(),
        "threads": threads,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "onnxruntime": ort.__version__,
        "litert": package_version("ai-edge-litert", "tflite-runtime"),
        "numpy": package_version("numpy"),
        "providers": list(providers),
        "available_providers": list(available_providers or ort.get_available_providers()),
        # Filled by device-profile runs (which node runs on which provider); None = not measured.
        "node_placement": None,
        "governor": governors(),
        "memory_total_mb": memory_total_mb(),
        "android": android_properties(),
        "at_start": thermal_snapshot(),
        "at_end": None,
    }
