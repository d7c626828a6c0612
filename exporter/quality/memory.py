"""Memory and session settings of the sessions that verify an export (parity gate, quality
card, streamed reference): garbage and freed heap handed back to the OS, no arena, no
spinning threads, fp16 weights kept fp16. Nothing here imports torch."""

from __future__ import annotations


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (the runtime's
    :func:`~slmedge.runtimes.sessions.onnx_decoder.release_free_heap`): the released PyTorch
    reference's tensors otherwise stay in the process's RSS under ONNX Runtime's session
    (glibc raises its mmap threshold as large blocks are freed, so later ones come from the
    heap, which only a trim returns)."""
    import gc

    from slmedge.runtimes.sessions.onnx_decoder import release_free_heap

    gc.collect()
    release_free_heap()


#: ONNX Runtime's graph transformer that turns a Cast(fp16 initializer) inserted before a node
#: with no fp16 kernel (every MatMul on x86) into an fp32 initializer: a second, fp32 copy of
#: the weights at load (not ConstantFolding: disabling that alone left Qwen2.5-0.5B fp16 at
#: 2.1 GB after load for a 0.99 GB file; this one: 0.34 GB)
FP16_TO_FP32_FOLD = "FuseFp16InitializerToFp32NodeTransformer"


def verification_session_options(keep_fp16: bool = False):
    """ONNX Runtime options for the sessions that verify an export (parity gate, quality
    card): no CPU memory arena, whose blocks stay reserved at the largest step's size (the
    prefill of a card window: logits of 512 positions x the vocabulary) after it is done.

    ``keep_fp16``: an fp16 graph's weights stay fp16 in the session (ONNX Runtime then casts
    each to fp32 when its node runs, instead of holding an fp32 copy of all of them).
    Measured on Qwen2.5-0.5B fp16 (0.99 GB file, tools/bench/results/fp16_session_0.5b.json):
    peak 3.2 -> 1.9 GB, session creation 10-17 -> 2-3 s, a 512-token prefill as fast, a
    decode step ~2.5x slower (every weight cast per step), logits within one fp16 step.
    Priority-based execution order runs each Cast just before its node (the default order runs
    the initializers' Casts first: all fp32 copies alive at once, peak 2.6 GB), and a fixed
    mmap threshold hands each freed copy back (:func:`fixed_mmap_threshold`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    # Worker threads sleep between ops instead of spinning: an export shares the machine
    # (other processes, the quantizer's threads), and a spinning pool's waits take the cores
    # its own work needs. Same kernels, same thread count: the same logits. Measured at load
    # 15-18 on 2 cores, 32 decode steps of Qwen2.5-0.5B int4 (alternating, 3 sessions each):
    # 5.1-6.2 s spinning, 3.8-4.1 s not (CPU 1.7-2.0 vs 1.1 s); SmolLM2 int4 2.2-2.7 vs 1.6-2.1 s.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if keep_fp16:
        opts.add_session_config_entry("optimization.disable_specified_optimizers",
                                      FP16_TO_FP32_FOLD)
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        fixed_mmap_threshold()
    return opts


def fixed_mmap_threshold(size: int = 1 << 20) -> bool:
    """Serve every allocation of ``size`` bytes or more with its own mmap (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), for this process from now on; False where there is no such
    call. glibc's default threshold rises to the size of the largest block freed (up to 32 MB),
    so the per-step fp32 casts of a keep_fp16 session came from the heap and stayed in the
    RSS (0.5B fp16: peak 2.6 GB with the default threshold, 1.9 GB with 1 MB fixed)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(-3, int(size)))  # -3: M_MMAP_THRESHOLD
