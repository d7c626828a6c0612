"""Keep third-party chatter off the terminal during an export or a quantization.

torch.onnx logs a warning per missing optional op library ("torchvision is not installed.
Skipping torchvision::nms", ...), transformers draws a tqdm bar while dequantizing GGUF
tensors (a plain ``tqdm``, which its ``disable_progress_bar`` does not reach) and warns about
deprecated arguments that our wrapper passes on purpose, and ONNX Runtime's int4 quantizer
makes PyTorch print "The given NumPy array is not writable ..." (``torch.from_numpy`` on a
read-only initializer, onnxruntime 1.32 ``matmul_nbits_quantizer.py``) during every int4
export. None of it is something a user can act on; slmedge shows its own progress instead,
and real errors still surface as exceptions.

``slmedge -v`` (``SLMEDGE_VERBOSE=1``) leaves everything as the libraries print it.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from contextlib import contextmanager

#: Set by ``slmedge -v/--verbose`` (tools/cli/app.py); read each time a quiet block opens.
VERBOSE_ENV = "SLMEDGE_VERBOSE"

#: UserWarnings of dependencies that say nothing actionable to an slmedge user.
NOISE = (
    # PyTorch via onnxruntime.quantization.matmul_nbits_quantizer (HQQ / int4): the array is
    # only read there
    r"The given NumPy array is not writable",
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextmanager
def _quiet_gguf_bar():
    """transformers' GGUF loader calls its module's own ``tqdm``: disable that one."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except Exception:  # pragma: no cover - no transformers / gguf: nothing to quiet
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


@contextmanager
def quiet_libraries():
    """Silence the dependencies' logs, bars and warnings listed above inside the block
    (nothing changes under ``slmedge -v``). Usable as a decorator."""
    if verbose():
        yield
        return
    torch_onnx = logging.getLogger("torch.onnx")
    old_level = torch_onnx.level
    torch_onnx.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is part of the [export] extra
        hf_logging = None
    if hf_logging is not None:
        old_verbosity = hf_logging.get_verbosity()
        bars_were_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), _quiet_gguf_bar():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            for message in NOISE:
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            yield
    finally:
        torch_onnx.setLevel(old_level)
        if hf_logging is not None:
            hf_logging.set_verbosity(old_verbosity)
            if bars_were_enabled:
                hf_logging.enable_progress_bar()
