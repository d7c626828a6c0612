"""Keep third-party chatter off the terminal during an export.

torch.onnx logs a warning per missing optional op library (torchvision), transformers
draws tqdm bars while dequantizing GGUF tensors and warns about deprecated arguments
that our wrapper passes on purpose. slmedge shows its own progress instead; real errors
still surface as exceptions.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager


@contextmanager
def quiet_libraries():
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        torch_onnx.setLevel(old_level)
        if hf_logging is not None:
            hf_logging.set_verbosity(old_verbosity)
            if bars_were_enabled:
                hf_logging.enable_progress_bar()
