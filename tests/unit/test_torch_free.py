"""runtimes/ and device_profiles/ must run on a Pi with onnxruntime + numpy: no torch, no transformers."""

import pkgutil
import subprocess
import sys

import slmedge.device_profiles
import slmedge.runtimes


def _all_modules(package) -> list[str]:
    return [package.__name__] + [
        m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    ]


def test_runtime_packages_do_not_import_torch_or_transformers():
    modules = _all_modules(slmedge.runtimes) + _all_modules(slmedge.device_profiles)
    modules += ["slmedge.tools.cli.app"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'tensorflow'))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
    assert len(modules) >= 8  # the walk found the package's modules, not just its __init__
