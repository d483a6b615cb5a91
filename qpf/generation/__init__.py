"""Generation: exact incremental decoding, sampling loops, beam search, streaming evaluation.

Written against the model-family contract (``qpf.models.family``): a Flax module called as
``module.apply(params, inputs, state)`` and the family's ``init_state``. ``params`` is
always the variables dict given to ``module.apply`` (``{'params': ...}``).

- ``prefill`` / ``step``: prompt in one pass (or chunks), then one token at a time; the
  logits equal the full forward pass's (exact, including byte_patch mode).
- ``decode`` / ``generate``: compiled sampling loop with per-row EOS stopping.
- ``beam_search``: beams as batch rows, states reordered by a gather over the batch axis.
- ``stream_logprobs`` / ``evaluate_stream``: NLL of inputs of any length in flat memory.
- ``generate_text``: streaming text pieces for a CLI.
- ``generate_from_run`` / ``stream_from_run`` (``qpf.generation.from_run``): the same from
  a training run directory (imported lazily: it pulls in the training and data stack).

Episodic memory must use a streamable regime ('chunked' or 'sliding'); 'original' switches
its rule with the total length and is rejected when a state is passed.
"""

from qpf.generation.core import (
    DecodeState,
    batch_axes,
    forward_last,
    prefill,
    start_state,
    step,
    take_rows,
)
from qpf.generation.decode import (
    BeamResult,
    DecodeResult,
    beam_search,
    decode,
    generate,
    length_normaliser,
)
from qpf.generation.stream import StreamStats, chunk_logprobs, evaluate_stream, stream_logprobs
from qpf.generation.text import generate_text

# Loaded on first use, to keep importing qpf.generation light: from_run imports
# qpf.training.restore (Orbax, the run config). The dependency is one-way: qpf.training
# never imports qpf.generation.
_FROM_RUN = ("GenerateOptions", "generate_from_run", "stream_from_run", "stream_loaded")


def __getattr__(name: str):
    if name in _FROM_RUN:
        from qpf.generation import from_run

        return getattr(from_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BeamResult",
    "DecodeResult",
    "DecodeState",
    "GenerateOptions",
    "StreamStats",
    "batch_axes",
    "beam_search",
    "chunk_logprobs",
    "decode",
    "evaluate_stream",
    "forward_last",
    "generate",
    "generate_from_run",
    "generate_text",
    "length_normaliser",
    "prefill",
    "start_state",
    "step",
    "stream_from_run",
    "stream_loaded",
    "stream_logprobs",
    "take_rows",
]
