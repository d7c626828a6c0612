"""The quality card's reference computed in PyTorch from the source, one decoder layer at a time.

The card's usual reference is an ONNX Runtime session of the fp32 graph: 4 bytes per
parameter (13 GB at 3B), more than a phone-class model's export should need (issue 15). This
reference is the source itself: the model is built with empty parameters (``empty_model``),
the embedding, final norm and head are read from the source once per pass, and each decoder
layer's weights are read (as fp32) just before its forward and dropped right after (forward
pre/post hooks). All sequences of a pass run as one batch, right-padded (a causal decoder's
positions never see the padding after them), so every layer is read once per pass.
Memory: one layer + embedding + head + the batch's activations.

Greedy decoding cannot stream that way (64 decode steps would read every layer 64 times), so
a streamed reference scores greedy text the other way round: the candidate generates, and
the reference scores the candidate's sequence in one teacher-forced pass
(:meth:`StreamedReference.score`; ``greedy.generated_by: "candidate"`` in the card).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from slmedge.runtimes.errors import ModelSourceError
from slmedge.runtimes.evaluate import plan_windows
from slmedge.runtimes.check.target_card import REPLAY_WINDOW

from slmedge.exporter.onnx.lazy_weights import WeightSource, empty_model, parameter_aliases
from slmedge.exporter.quality.card import (
    QualitySettings,
    RecordedReference,
    eval_token_ids,
    replay_reference_calls,
)
from slmedge.exporter.quality.memory import fixed_mmap_threshold, release_memory
from slmedge.exporter.onnx.streaming import decoder_layers

Progress = Callable[[str], None]


def source_dtype(weights: WeightSource) -> str:
    """How the card names the checkpoint's precision (``bf16``, ``fp16``, ``fp32``): the dtype
    of one of its norm weights (small); ``GGUF`` for a GGUF file (its blocks are dequantized)."""
    if "gguf" in type(weights).__name__.lower():
        return "GGUF"
    names = sorted(weights.names())
    name = next((n for n in names if "norm" in n), names[0])
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16",
            "torch.float32": "fp32"}.get(str(weights.read(name).dtype), "source")


class StreamedReference:
    """The source model in fp32 compute with no weight held between passes.

    ``config``: the transformers config; ``weights``: the source's tensors
    (:class:`~slmedge.exporter.onnx.lazy_weights.WeightSource`); ``source_dtype``: how the card
    names the source's precision (e.g. ``bf16``)."""

    def __init__(self, config, weights: WeightSource, *, source_dtype: str = "source",
                 progress: Progress | None = None):
        import copy

        import torch

        # a copy: building the fp32 model sets the config's dtype, and the export's own model
        # shares the one passed here
        config = copy.deepcopy(config)
        self.config = config
        self.weights = weights
        self.description = (f"PyTorch {source_dtype} source, streamed layer by layer "
                            "(fp32 compute)")
        self._say = progress or (lambda _m: None)
        # each layer's fp32 weights are freed after its forward: with glibc's default (rising)
        # mmap threshold the next layer's came from the heap and the freed pages stayed in
        # the RSS (Qwen2.5-0.5B, one pass of the card's 1024-token windows: peak 2052 -> 1155
        # MiB, 1533 -> 418 MiB after release; tools/bench/results/fp16_session_0.5b.json)
        fixed_mmap_threshold()
        self.model = empty_model(config, torch.float32)
        layer_count = int(getattr(config, "num_hidden_layers"))
        self._layers = decoder_layers(self.model, layer_count)
        if self._layers is None:
            raise ModelSourceError(f"no list of {layer_count} decoder layers in "
                                   f"{type(self.model).__name__}; the streamed reference needs one")
        available = weights.names()
        aliases = parameter_aliases(self.model)
        full_name = {}
        for name, param in self.model.named_parameters():  # tied parameters once
            found = next((n for n in aliases[name] if n in available), None)
            if found is None:
                raise ModelSourceError(f"{weights.describe()} has no tensor for {name}")
            full_name[id(param)] = (found, param, tuple(param.shape))
        in_layers = {id(p) for layer in self._layers for p in layer.parameters()}
        self._per_layer = [[full_name[id(p)] for p in layer.parameters()] for layer in self._layers]
        # embedding, final norm, head (one tensor when tied), GPT-2's position table
        self._outer = [v for k, v in full_name.items() if k not in in_layers]
        # an untied embedding and head are read one after the other, not side by side: the
        # head only for the logits (after the layers), the embedding dropped once it has run
        # (Llama-3.1-8B: each is 2.1 GB in fp32)
        head = {id(p) for p in self.model.get_output_embeddings().parameters()}
        embedding = self.model.get_input_embeddings()
        self._head = [v for k, v in full_name.items() if k in head]
        self._before_head = [v for k, v in full_name.items()
                             if k not in in_layers and k not in head]
        self._embedding_only = [full_name[id(p)] for p in embedding.parameters()
                                if id(p) not in head]
        self._embedding = embedding
        self._head_loaded = False
        self.release()

    # -- weights
    def _fill(self, entries) -> None:
        import torch

        for source_name, param, shape in entries:
            tensor = self.weights.read(source_name)
            if tuple(tensor.shape) != shape:
                raise ModelSourceError(f"{self.weights.describe()}: tensor {source_name} has "
                                       f"shape {tuple(tensor.shape)}, the model's is {shape}")
            param.data = tensor.to(torch.float32).contiguous()

    def _drop(self, entries) -> None:
        import torch

        for _, param, _ in entries:
            param.data = torch.empty(0)  # the weight's memory goes back

    def release(self) -> None:
        """Drop every weight (the model keeps its structure) and hand the memory back."""
        for entries in (self._outer, *self._per_layer):
            self._drop(entries)
        self._head_loaded = False
        release_memory()

    # -- forward
    def hidden_states(self, sequences: Sequence[Sequence[int]]) -> list:
        """The final hidden states (after the final norm) of every sequence, one batched pass
        that reads each decoder layer once. Keeps the final norm (and a tied embedding) loaded:
        call :meth:`logits` on the result, then :meth:`release`."""
        import torch

        longest = max(len(s) for s in sequences)
        batch = torch.tensor([list(s) + [int(s[-1])] * (longest - len(s)) for s in sequences],
                             dtype=torch.long)
        self._drop(self._head)  # read again by logits(), after the layers
        self._head_loaded = False
        self._fill(self._before_head)
        t0 = time.perf_counter()
        total = len(self._per_layer)

        def before(index):
            def hook(_module, _args, _kwargs=None):
                eta = (time.perf_counter() - t0) / index * (total - index) if index else None
                self._say(f"streamed reference: layer {index + 1}/{total} of {len(sequences)} "
                          "sequences" + (f", ETA {eta:.0f} s" if eta else ""))
                self._fill(self._per_layer[index])
            return hook

        def after(index):
            def hook(_module, _args, _output):
                self._drop(self._per_layer[index])
            return hook

        handles = []
        if self._embedding_only:
            handles.append(self._embedding.register_forward_hook(
                lambda _module, _args, _output: self._drop(self._embedding_only)))
        else:  # tied: the embedding is the head, read now
            self._fill(self._head)
            self._head_loaded = True
        for i, layer in enumerate(self._layers):
            handles.append(layer.register_forward_pre_hook(before(i)))
            handles.append(layer.register_forward_hook(after(i)))
        try:
            with torch.no_grad():
                out = self.model.base_model(input_ids=batch, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return [hidden[i, : len(s)] for i, s in enumerate(sequences)]

    def logits(self, hidden) -> np.ndarray:
        """The head's logits of hidden states (the CausalLM's own final soft-capping, Gemma's,
        applied as its forward does)."""
        import torch

        if not self._head_loaded:
            self._fill(self._head)
            self._head_loaded = True
        with torch.no_grad():
            logits = self.model.get_output_embeddings()(hidden)
            cap = getattr(self.config, "final_logit_softcapping", None)
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
        return logits.numpy().astype(np.float32, copy=False)

    def score(self, sequences: Sequence[Sequence[int]], last: int) -> list[np.ndarray]:
        """Teacher-forced logits of the ``last`` positions of each sequence (one pass):
        row ``j`` predicts the token after position ``len(s) - last + j``."""
        try:
            hidden = self.hidden_states(sequences)
            return [self.logits(h[len(s) - last :]) for h, s in zip(hidden, sequences)]
        finally:
            self.release()

    def record(self, tokenizer_dir: Path, settings: QualitySettings, path: Path,
               progress: Progress | None = None) -> RecordedReference | None:
        """:func:`record_streamed_reference` of this reference: what ``quality.artifact_card``
        calls on its ``reference_source`` (a method, so quality/card.py need not import this
        module, which imports it: no import cycle)."""
        return record_streamed_reference(self, tokenizer_dir, settings, path, progress=progress)


class _Precomputed:
    """A decoder that serves whole-sequence logits from one batched pass (the card's windows
    and the replay window); any other call is an error."""

    def __init__(self, reference: StreamedReference, hidden: dict):
        self._reference = reference
        self._hidden = hidden

    def reset(self) -> None:
        pass

    def step(self, token_ids, all_logits: bool = False):
        key = tuple(int(t) for t in token_ids)
        if not all_logits or key not in self._hidden:
            raise RuntimeError("the streamed reference serves the card's windows only "
                               f"({len(key)} tokens asked, all_logits={all_logits})")
        return self._reference.logits(self._hidden[key])


def record_streamed_reference(reference: StreamedReference, tokenizer_dir: Path,
                              settings: QualitySettings, path: Path,
                              progress: Progress | None = None) -> RecordedReference | None:
    """The calls :func:`~slmedge.exporter.quality.card.record_reference` records (the windows, the
    replay window), computed by ``reference`` in one streamed pass, recorded in ``path``.
    The greedy prompts are not recorded: the card scores the candidate's greedy text with
    ``reference.score`` (the returned recording's ``teacher_forced``)."""
    from slmedge.runtimes.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_dir)
    found = eval_token_ids(tokenizer, settings)
    if found is None:
        return None
    ids = [int(i) for i in found[0]]
    sequences = {tuple(ids[w.begin : w.end]) for w in plan_windows(len(ids), settings.window,
                                                                     settings.stride)}
    if len(ids[:REPLAY_WINDOW]) >= 2:
        sequences.add(tuple(ids[:REPLAY_WINDOW]))
    ordered = sorted(sequences, key=len, reverse=True)
    try:
        hidden = dict(zip(ordered, reference.hidden_states(ordered)))
        recorded = RecordedReference(path)
        replay_reference_calls(recorded.wrap(_Precomputed(reference, hidden)), tokenizer, ids,
                               settings, greedy=False)
    finally:
        reference.release()
    recorded.teacher_forced = reference
    recorded.card_reference = reference.description
    return recorded.finish()
