"""LLM Lightwave's own beam search (``beam_search_generate`` at the original's HEAD).

Kept beside the shared ``qpf.generation.beam_search`` so the original's outputs can be
reproduced exactly; it runs on any registered family (it only needs the call contract and
the decoding state). Per step, for every live beam (spec other_seeds §1.6):

1. logits of its last token / max(temperature, 0.7); the EOT logit is −∞ while
   step < min_length; softmax; the top ``top_mult·width`` tokens with p ≥ 1e-10;
2. all candidates run through the model as one batch from the parent's decoding state;
   score = parent score + log(p + 1e-12) (the log in the logits' dtype, as the original's
   ``torch.tensor`` in the default dtype);
3. an EOT candidate finishes: its score is divided by ((5 + n)/6)^length_penalty with n
   the generated tokens (EOT included); any other candidate lives on and loses
   ``repeat_penalty·count`` permanently if its token occurs more than ``repeat_threshold``
   times among the last ``repeat_window`` tokens of its sequence;
4. live candidates are deduplicated by token sequence (best score kept) and the top
   ``width`` by raw score survive; the search stops early once ≥ 2·width beams finished.

Final ranking over finished + live beams: score/((5 + n)/6)^length_penalty, plus
``final_bonus`` for finished beams with min_length ≤ n ≤ max_bonus_len. Finished beams are
therefore length-normalised twice (the original's behaviour, kept for parity).

Unlike the original, neural-mode models work here: the original's neural modulator cannot
broadcast a batch-1 cache over the candidate batch and raises for any candidate count > 1.
Scores are host float64, as the original's Python floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from qpf.generation.core import family_init_state, take_rows

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class OriginalBeamConfig:
    """The original's ``beam_search_generate`` settings (its defaults)."""

    width: int = 5
    max_new_tokens: int = 180
    temperature: float = 0.7
    min_temperature: float = 0.7
    length_penalty: float = 0.6
    min_length: int = 40
    top_mult: int = 3
    min_prob: float = 1e-10
    repeat_window: int = 20
    repeat_threshold: int = 2
    repeat_penalty: float = 0.1
    final_bonus: float = 0.5
    max_bonus_len: int = 150

    def __post_init__(self) -> None:
        for name in ("width", "max_new_tokens", "top_mult", "repeat_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"OriginalBeamConfig.{name} = {v!r}: allowed an int >= 1")
        if self.temperature <= 0:
            raise ValueError(f"OriginalBeamConfig.temperature = {self.temperature}: allowed > 0")


@dataclasses.dataclass
class Beam:
    ids: list[int]
    score: float
    finished: bool
    row: int = -1  # row of the live-beam state (finished beams keep none)


@dataclasses.dataclass
class OriginalBeamResult:
    """final: finished + live beams at return (the original's ``all_beams``) with raw and
    normalised scores; best: the highest normalised; steps: live beams after each step."""

    final_ids: list[list[int]]
    final_raw_score: np.ndarray
    final_finished: np.ndarray
    final_norm_score: np.ndarray
    best_ids: list[int]
    step_ids: list[list[list[int]]]
    step_score: list[list[float]]


def _length_norm(n: int, alpha: float) -> float:
    return ((5.0 + n) / 6.0) ** alpha


def _state_axes(module: nn.Module, max_len: int) -> Any:
    init = family_init_state(module)
    one = jax.eval_shape(lambda: init(module.config, 1, max_len))
    two = jax.eval_shape(lambda: init(module.config, 2, max_len))

    def axis(a, b) -> int:
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        return diff[0] if diff else -1

    return jax.tree.map(axis, one, two)


def original_beam_search(
    module: nn.Module,
    params: Any,
    prompt: Sequence[int],
    config: OriginalBeamConfig = OriginalBeamConfig(),
    eos_id: int = 50256,
) -> OriginalBeamResult:
    """Beam search as the original; prompt: token ids (one sequence)."""
    c = config
    p_len = len(prompt)
    max_len = p_len + c.max_new_tokens + 1
    init = family_init_state(module)
    axes = _state_axes(module, max_len)
    k = c.top_mult * c.width
    rows_total = c.width * k  # fixed candidate batch (padded) -> one compilation

    @jax.jit
    def run(params: Any, state: Any, rows: Array, tokens: Array) -> tuple[Array, Any]:
        out = module.apply(params, tokens[:, None], take_rows(state, rows, axes))
        return out.logits[:, -1], out.state

    out = module.apply(
        params, jnp.asarray([list(prompt)], jnp.int32), init(module.config, 1, max_len)
    )
    # Live beams are rows of a width-row state (padded), so every step has the same shapes.
    pad = jnp.zeros((c.width,), jnp.int32)
    state = take_rows(out.state, pad, axes)
    logits = np.asarray(out.logits[:, -1])[np.zeros(c.width, int)]  # [width, V]
    beams = [Beam(list(prompt), 0.0, False, 0)]
    finished: list[Beam] = []
    step_ids: list[list[list[int]]] = []
    step_score: list[list[float]] = []
    temp = max(c.temperature, c.min_temperature)
    for step in range(c.max_new_tokens):
        cands: list[tuple[Beam, int, float]] = []
        for beam in beams:
            lg = logits[beam.row] / np.asarray(temp, logits.dtype)
            if step < c.min_length:
                lg = lg.copy()
                lg[eos_id] = -np.inf
            probs = np.exp(lg - lg.max())
            probs = probs / probs.sum()
            top = np.argsort(-probs, kind="stable")[:k]
            for tok in top:
                p = probs[tok]
                if p < c.min_prob:
                    continue
                logp = float(np.log(np.asarray(float(p) + 1e-12, logits.dtype)))
                cands.append((beam, int(tok), beam.score + logp))
        # One batched forward for every candidate from its parent's state.
        rows = np.zeros(rows_total, np.int32)
        toks = np.zeros(rows_total, np.int32)
        for i, (beam, tok, _) in enumerate(cands):
            rows[i], toks[i] = beam.row, tok
        new_logits, new_state = run(params, state, jnp.asarray(rows), jnp.asarray(toks))
        new_logits = np.asarray(new_logits)
        live: dict[tuple[int, ...], Beam] = {}
        for i, (beam, tok, score) in enumerate(cands):
            ids = [*beam.ids, tok]
            if tok == eos_id:
                n = len(ids) - p_len
                finished.append(Beam(ids, score / _length_norm(n, c.length_penalty), True))
                continue
            count = ids[-c.repeat_window :].count(tok)
            if count > c.repeat_threshold:
                score -= c.repeat_penalty * count
            key = tuple(ids)
            if key not in live or live[key].score < score:
                live[key] = Beam(ids, score, False, i)
        beams = sorted(live.values(), key=lambda b: b.score, reverse=True)[: c.width]
        step_ids.append([b.ids for b in beams])
        step_score.append([b.score for b in beams])
        rows = np.asarray([b.row for b in beams] + [0] * (c.width - len(beams)), np.int32)
        state = take_rows(new_state, jnp.asarray(rows), axes)
        logits = new_logits[rows]
        for j, b in enumerate(beams):
            b.row = j
        if len(finished) >= 2 * c.width or not beams:
            break
    final = finished + beams
    norm = []
    for b in final:
        n = len(b.ids) - p_len
        s = b.score / _length_norm(n, c.length_penalty)
        if b.finished and c.min_length <= n <= c.max_bonus_len:
            s += c.final_bonus
        norm.append(s)
    best = final[int(np.argmax(norm))].ids
    return OriginalBeamResult(
        final_ids=[b.ids for b in final],
        final_raw_score=np.asarray([b.score for b in final]),
        final_finished=np.asarray([b.finished for b in final]),
        final_norm_score=np.asarray(norm),
        best_ids=best,
        step_ids=step_ids,
        step_score=step_score,
    )
