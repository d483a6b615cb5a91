"""The v4 phase-field language model, wired in the original's order (spec §1).

embed -> banks (each on the same input) -> interference coupler (no skip around it)
-> oscillatory SSM -> + memory_scale·global memory -> + weight·episodic memory
-> LM head (token/morphological) or causal within-patch byte decoder (byte_patch).

Every call takes an optional decoding ``state`` (``init_state``) and returns the new one,
so a sequence processed in pieces gives the same logits as one pass (for the streamable
episodic regimes). With ``state=None`` the call is an ordinary full forward from position 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf import config as cfgs
from qpf.layers.backbones import BACKBONES
from qpf.layers.banks import BANKS
from qpf.layers.blocks import ComplexRMSNorm
from qpf.layers.core import Phase2DEmbed, Phase2DLayerNorm, Phase2DLinear, complex_table, dense
from qpf.layers.coupler import COUPLERS, coupling_loss
from qpf.layers.embeddings import (
    BYTE_PAD,
    BytePatchDecoder,
    BytePatchEncoder,
    MorphologyEmbed,
)
from qpf.layers.head import LMHead
from qpf.layers.memory import MEMORIES, EpisodicMemory
from qpf.models.contract import DTYPES, ModelOutput, State, applies_matmul_precision
from qpf.ops import phase2d as p2d
from qpf.ops.losses import head_logits

Array = jax.Array


def segment_resets(config: cfgs.ModelConfig) -> str:
    """'' when ``config`` resets at document starts (``segment_ids``), else why not.

    Honoured: token and morphological input, every bank (the context window stops at a
    document start; the others are position-wise), the coupler and global memory
    (position-wise), the oscillatory SSM backbone with every v4/v5 option (recurrence and
    causal convolution reset), the matrix-state backbone (memories and local attention),
    episodic memory in the 'chunked' and 'sliding' regimes. Not wired: byte patches (a
    document may start inside a patch).
    """
    why = []
    if config.input_mode == "byte_patch":
        why.append(
            "input_mode 'byte_patch' (a document may start inside a patch; use "
            "input_mode='token' with the byte vocabulary)"
        )
    if config.episodic is not None and config.episodic.regime == "original":
        why.append("episodic regime 'original' (use 'chunked' or 'sliding')")
    return "; ".join(why)


def init_state(config: cfgs.ModelConfig, batch_size: int) -> State:
    """The zero decoding state for ``batch_size`` rows at position 0.

    pos: tokens consumed so far (bytes in byte_patch mode); banks: per stateful bank;
    backbone: its ``init_state`` (oscillatory SSM: ``[L, B, 2, N]`` float32, a dict with the
    causal convolution's tails when ``backbone.conv_width`` > 0; matrix-state: its memories
    and attention caches); episodic: last 2W keys/values; byte: the last P bytes and the
    context of the current patch.
    """
    dt = DTYPES[config.dtype]
    state: State = {
        "pos": jnp.zeros((), jnp.int32),
        "banks": {
            b.type: BANKS.get(b.type).init_state(b, batch_size, config.dim, dt)
            for b in config.banks
            if hasattr(BANKS.get(b.type), "init_state")
        },
        "backbone": BACKBONES.get(config.backbone.type).init_state(
            config.backbone, batch_size, p2d.acc_dtype(dt), config.dim
        ),
    }
    if config.episodic is not None:
        state["episodic"] = EpisodicMemory.init_state(config.episodic, batch_size, config.dim, dt)
    if config.input_mode == "byte_patch":
        p = config.byte_patch.patch_size
        state["byte"] = {
            "tail": jnp.full((batch_size, p), BYTE_PAD, jnp.int32),
            # Summary of the last complete patch; at pos 0 the learned start context is used.
            "context": jnp.zeros((batch_size, 2, config.dim), dt),
        }
    return state


class QPFModel(nn.Module):
    """The full model. See module docstring for the data flow and ``ModelOutput``."""

    config: cfgs.ModelConfig

    def setup(self) -> None:
        c = self.config
        kw = {"dtype": DTYPES[c.dtype], "param_dtype": DTYPES[c.param_dtype]}
        if c.input_mode == "token":
            self.embed = Phase2DEmbed(vocab_size=c.vocab_size, dim=c.dim, **kw)
        elif c.input_mode == "morphological":
            self.embed = MorphologyEmbed(cfg=c.morphology, dim=c.dim, **kw)
        else:
            bp = c.byte_patch
            self.patcher = BytePatchEncoder(
                vocab_size=c.vocab_size, dim=c.dim, patch_size=bp.patch_size, **kw
            )
            self.byte_decoder = BytePatchDecoder(
                vocab_size=c.vocab_size,
                dim=c.dim,
                patch_size=bp.patch_size,
                num_layers=bp.decoder_layers,
                **kw,
            )
            self.start_context = complex_table(self, "start_context", 1, c.dim, kw["param_dtype"])
        self.banks = {b.type: BANKS.get(b.type)(cfg=b, **kw) for b in c.banks}
        if c.banks:
            self.coupler = COUPLERS.get(c.coupler.type)(
                cfg=c.coupler, bank_names=c.bank_names, **kw
            )
        self.backbone = BACKBONES.get(c.backbone.type)(cfg=c.backbone, **kw)
        if c.memory is not None:
            self.memory = MEMORIES.get(c.memory.type)(cfg=c.memory, **kw)
            self.memory_scale = self.param(
                "memory_scale", nn.initializers.constant(c.memory.scale_init), (), kw["param_dtype"]
            )
        if c.episodic is not None:
            self.episodic = EpisodicMemory(cfg=c.episodic, **kw)
        if c.input_mode != "byte_patch":
            self.head_proj = Phase2DLinear(features=c.dim, **kw)
            norm = ComplexRMSNorm if c.head_norm == "rms" else Phase2DLayerNorm
            self.head_norm = norm(param_dtype=kw["param_dtype"])
            if not c.tie_embeddings:
                self.output_proj = LMHead(c.vocab_size, **kw)
        if c.input_mode == "morphological":
            m = c.morphology
            self.prefix_head = dense(m.prefix_vocab_size, use_bias=False, **kw)
            self.suffix_head = dense(m.suffix_vocab_size, use_bias=False, **kw)

    # ------------------------------------------------------------------ entry point

    @applies_matmul_precision
    def __call__(
        self,
        inputs: Array,
        state: State | None = None,
        *,
        deterministic: bool = True,
        language_ids: Array | None = None,
        return_intermediates: bool = False,
        return_features: bool = False,
        segment_ids: Array | None = None,
    ) -> ModelOutput:
        """Forward over a chunk of tokens.

        Args:
          inputs: int ``[B, T]`` token (or byte) ids, or ``[B, T, 3]`` (root, prefix,
            suffix) ids in morphological mode.
          state: decoding state from ``init_state`` or a previous call; None = fresh.
            In byte_patch mode ``state['pos']`` must be a multiple of the patch size (true
            for fresh states and after any multiple-of-P chunk).
          deterministic: False enables dropout (needs a 'dropout' rng).
          language_ids: ``[B]`` ids for the language bank (default 0).
          return_intermediates: also return every stage's tensor.
          return_features: return the head input ``features [B, T, 2d]`` and
            ``head_weight [2d, V]`` instead of logits (token and morphological modes; the
            byte-patch decoder is not linear and still returns logits).
          segment_ids: int ``[B, T]`` documents of a packed window (full forwards, token and
            morphological modes; ``segment_resets`` lists the components that honour it):
            each document gets the logits it would get alone. None: one document.
        """
        batch = inputs.shape[0]
        fresh = state is None
        if segment_ids is not None:
            reason = segment_resets(self.config)
            if reason or not fresh:
                raise ValueError(
                    f"segment_ids: {reason or 'for full forwards (state=None), not decoding'}"
                )
        state = init_state(self.config, batch) if fresh else state
        if self.config.input_mode == "byte_patch":
            return self._byte_forward(
                inputs, state, fresh, deterministic, language_ids, return_intermediates
            )
        inter: dict[str, Array] = {}
        if self.config.input_mode == "morphological":
            x = self.embed(inputs[..., 0], inputs[..., 1], inputs[..., 2])
        else:
            x = self.embed(inputs)
        h, new_state, coupling = self.phase_trunk(
            x,
            state,
            fresh,
            deterministic=deterministic,
            language_ids=language_ids,
            inter=inter,
            segment_ids=segment_ids,
        )
        new_state["pos"] = state["pos"] + inputs.shape[1]
        u = p2d.to_concat(self.head_norm(self.head_proj(h)))
        weight = self._head_weight(u)
        out = ModelOutput(
            logits=None if return_features else head_logits(u, weight, DTYPES[self.config.dtype]),
            phase_states=h,
            coupling_loss=coupling,
            state=new_state,
            intermediates=inter if return_intermediates else None,
            features=u if return_features else None,
            head_weight=weight if return_features else None,
        )
        if self.config.input_mode == "morphological":
            out = out.replace(prefix_logits=self.prefix_head(u), suffix_logits=self.suffix_head(u))
        return out

    def _head_weight(self, features: Array) -> Array:
        """The LM head kernel ``[2d, V]``: its own, or the embedding tables when tied."""
        if self.config.tie_embeddings:
            return self.embed.head_weight()
        return self.output_proj(features, return_weight=True)

    # ---------------------------------------------------------------- shared trunk

    def phase_trunk(
        self,
        x: Array,
        state: State,
        fresh: bool,
        *,
        deterministic: bool,
        language_ids: Array | None,
        inter: dict[str, Array],
        segment_ids: Array | None = None,
    ) -> tuple[Array, State, Array]:
        """banks -> coupler -> backbone -> memories on ``x [B, T, 2, d]`` (formerly ``core``).

        The part shared by every input mode, between the embedding and the LM head.
        segment_ids ``[B, T]``: document resets of the context bank, backbone and episodic
        memory (the other stages are position-wise).

        Returns (phase states ``[B, T, 2, d]``, new state without 'pos', coupling loss).
        """
        c = self.config
        inter["embed"] = x
        new_state: State = {"banks": {}}
        outs = {}
        for name, bank in self.banks.items():
            outs[name], bank_state = bank(
                x,
                state["banks"].get(name),
                deterministic=deterministic,
                language_ids=language_ids,
                segment_ids=segment_ids,
            )
            if bank_state is not None:
                new_state["banks"][name] = bank_state
            inter[f"bank/{name}"] = outs[name]
        coupled = self.coupler(outs, deterministic=deterministic) if outs else x
        if len(outs) >= 2:
            coupling = coupling_loss([outs[n] for n in c.bank_names])
        else:
            coupling = jnp.zeros((), p2d.acc_dtype(x.dtype))
        inter["coupled"] = coupled
        h, new_state["backbone"] = self.backbone(
            coupled, state["backbone"], deterministic=deterministic, segment_ids=segment_ids
        )
        inter["backbone_out"] = h
        if c.memory is not None:
            values, read = self.memory(h)
            inter["memory_values"] = values
            inter["memory_topk_indices"], inter["memory_topk_weights"] = (
                read["indices"],
                read["weights"],
            )
            h = h + (self.memory_scale * values).astype(h.dtype)
        if c.episodic is not None:
            inter["episodic_input"] = h
            values, new_state["episodic"] = self.episodic(
                h, None if fresh else state["episodic"], self._trunk_pos(state), segment_ids
            )
            inter["episodic_values"] = values
            h = h + (c.episodic.weight * values).astype(h.dtype)
        inter["phase_states"] = h
        return h, new_state, coupling

    def _trunk_pos(self, state: State) -> Array:
        """Position of the trunk's first step: tokens, or patches in byte_patch mode."""
        if self.config.input_mode == "byte_patch":
            return state["pos"] // self.config.byte_patch.patch_size
        return state["pos"]

    # ------------------------------------------------------------------ byte mode

    def _byte_forward(self, ids, state, fresh, deterministic, language_ids, return_inter):
        """Causal byte-patch forward from a patch-aligned position n = state['pos'].

        Complete patches of this chunk go through the trunk; target byte j (logits[j-1])
        is decoded from the context of the patches before j's patch and bytes < j.
        """
        p = self.config.byte_patch.patch_size
        b, t = ids.shape
        n_complete = t // p
        inter: dict[str, Array] = {}
        start = self.start_context.astype(state["byte"]["context"].dtype)
        prev_context = jnp.where(state["pos"] == 0, start, state["byte"]["context"])
        if n_complete > 0:
            x = self.patcher(ids[:, : n_complete * p])
            h, new_state, coupling = self.phase_trunk(
                x,
                state,
                fresh,
                deterministic=deterministic,
                language_ids=language_ids,
                inter=inter,
            )
        else:  # no patch completes: the trunk's state is unchanged
            h = jnp.zeros((b, 0, 2, self.config.dim), prev_context.dtype)
            new_state = {k: v for k, v in state.items() if k not in ("pos", "byte")}
            coupling = jnp.zeros((), p2d.acc_dtype(h.dtype))
        contexts = jnp.concatenate([prev_context[:, None].astype(h.dtype), h], axis=1)
        grid_len = (n_complete + 1) * p
        tail = state["byte"]["tail"]
        prev = jnp.concatenate(
            [tail[:, -1:], ids, jnp.full((b, grid_len - 1 - t), BYTE_PAD, ids.dtype)], axis=1
        )
        logits = self.byte_decoder(prev.reshape(b, n_complete + 1, p), contexts)
        logits = logits.reshape(b, grid_len, -1)[:, 1 : t + 1]
        new_state["pos"] = state["pos"] + t
        new_state["byte"] = {
            "tail": jnp.concatenate([tail, ids.astype(tail.dtype)], axis=1)[:, -p:],
            "context": contexts[:, -1],
        }
        return ModelOutput(
            logits=logits,
            phase_states=h,
            coupling_loss=coupling,
            state=new_state,
            intermediates=inter if return_inter else None,
        )
