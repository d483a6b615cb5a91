"""The v3 "Brain-Inspired LM" (family ``qllm_v3``; spec v2_v3.md part B), in two modes.

Data flow (both modes; STM and LTM are ONE module each, shared by all layers)::

    tokens [B,T] -> E[x] (N(0,1) table) -> consciousness: h₁ = h₀ ⊙ w + h₀
      -> N x { STM: h = LN(W[h; σ(gate h)·S])        (no residual)
               LTM: h = h + 0.3·(concept + 0.5·episodic)
               spiking_i: h = syn_i(h) ⊙ (1 - refractory mask)
               DP_i }
      -> output_proj -> logits [B,T,V]

``mode='faithful'`` reproduces the original, leaks and persistent state included:

* w = softmax of LN(fusion(states)) + 0.1·g over the **time** axis (sees the future);
* spiking: one membrane/history vector ``[D]`` per layer, updated once per call from the
  batch-and-time mean, in train and eval alike;
* STM slots get the EMA write ``S <- d·S + (1-d)·ḡ x̄`` inside the forward (train mode),
  so later layers read the updated slots;
* DP: κ = batch mean of the unbiased variance over (T, D); ``lax.switch`` over
  [con_k∘exp_k for k = int(10κ) mod 3, base if κ < 0.1]; train-mode usage/importance
  counters; consolidation of the final hidden state into the episodic table when
  ``training_step`` is given and mean |h| > 0.8.

The persistent state lives in the Flax ``'state'`` collection (see ``PERSISTENT_KEYS``):
membrane potential and spike history ``[L, D]``, the STM slot and episodic-memory deltas
(the tables are parameters; the original also writes them through ``.data``, so the state
holds the written change: effective table = param + delta), episodic weights ``[E]``, DP
usage counts and importance ``[L, max_dim]``. Apply with ``mutable=['state']`` to get the
new state, or pass it in the decoding state (``faithful_state``) to thread it through
generation: the module always returns it in ``out.state['persistent']``.

``mode='sane'`` (default) keeps the components but makes the model a function of each
sequence's own past, with no persistent state:

* w_t = exp(c_t - logsumexp_{s≤t} c_s): a causal running softmax (state: the running
  logsumexp ``[B, D]``); the global offset g and the LayerNorm bias there are dropped
  because a per-feature constant cancels in a softmax over time (zero gradient);
* STM slots and the episodic table are plain trained parameters (read only in the
  forward); no consolidation; no DP counters;
* spiking: ``'lif'`` = per-token leaky integrate-and-fire per sequence with a surrogate
  gradient (state v, hist ``[L, B, D]``), or ``'off'`` (just the synaptic Linear);
* DP: one pre-LN residual GELU MLP per layer (the per-batch branch choice mixes rows).

Decoding state (sane): ``{"pos", "lse" [B,D], "v" [L,B,D], "hist" [L,B,D]}``; feeding a
sequence in pieces gives the same logits as one pass. v3 has no dropout, so
``deterministic`` only selects the faithful train/eval behaviour.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from qpf.config import NumericsConfig, positive_int, require
from qpf.models.baseline_layers import DTYPES
from qpf.models.contract import ModelOutput, applies_matmul_precision
from qpf.models.family import ModelFamily, Preset, State
from qpf.ops import v3_ops as ops

Array = jax.Array

V3_MODES = ("faithful", "sane")
SPIKING = {"faithful": ("global",), "sane": ("lif", "off")}
PERSISTENT_KEYS = (
    "membrane_potential",
    "spike_history",
    "memory_slots_delta",
    "episodic_memory_delta",
    "episodic_weights",
    "usage_count",
    "importance_scores",
)


@dataclasses.dataclass(frozen=True)
class QLLMv3Config(NumericsConfig):
    """v3 model sizes and switches.

    memory_size: STM slots M; concept_dim/num_concepts: LTM concept table [K, C];
    episodic_slots: E (100 in the original); max_dim: length of the DP counters (1024).
    mode: 'faithful' | 'sane' (module docstring). spiking: 'auto' (faithful -> 'global',
    sane -> 'lif'), or explicitly 'global' (faithful only), 'lif' or 'off' (sane only).
    spike_threshold/spike_decay/refractory_threshold: 1.0 / 0.9 / 0.1 as the original;
    surrogate_slope: fast-sigmoid slope of the LIF surrogate gradient.
    mlp_ratio: hidden width / dim of the sane DP MLP.
    matmul_precision: precision of float32 matrix products (``qpf.config.MATMUL_PRECISIONS``).
    dtype: compute dtype of GEMMs; norms, softmaxes, spiking state are float32 (or f64).
    """

    family_name: ClassVar[str] = "qllm_v3"  # its qpf.zoo family (not a field)

    vocab_size: int = 259
    dim: int = 128
    num_layers: int = 4
    memory_size: int = 64
    concept_dim: int = 256
    num_concepts: int = 1024
    episodic_slots: int = 100
    max_dim: int = 1024
    mode: str = "sane"
    spiking: str = "auto"
    spike_threshold: float = 1.0
    spike_decay: float = 0.9
    refractory_threshold: float = 0.1
    surrogate_slope: float = 10.0
    mlp_ratio: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(
            self,
            "vocab_size",
            "dim",
            "num_layers",
            "memory_size",
            "concept_dim",
            "num_concepts",
            "episodic_slots",
            "mlp_ratio",
        )
        require(self.mode in V3_MODES, self, "mode", f"one of {', '.join(V3_MODES)}")
        allowed = ("auto", *SPIKING.get(self.mode, ()))
        require(self.spiking in allowed, self, "spiking", f"one of {', '.join(allowed)}")
        require(isinstance(self.max_dim, int) and self.max_dim >= 3, self, "max_dim", "an int >= 3")
        for f in ("spike_decay", "refractory_threshold"):
            v = getattr(self, f)
            require(isinstance(v, int | float) and 0.0 < v < 1.0, self, f, "a float in (0, 1)")
        for f in ("spike_threshold", "surrogate_slope"):
            v = getattr(self, f)
            require(isinstance(v, int | float) and v > 0.0, self, f, "a float > 0")

    @property
    def spiking_kind(self) -> str:
        """The spiking rule in effect ('auto' resolved by mode)."""
        if self.spiking != "auto":
            return self.spiking
        return "global" if self.mode == "faithful" else "lif"


def init_state(config: QLLMv3Config, batch_size: int, max_len: int | None = None) -> State:
    """Decoding state at position 0 (``max_len`` unused: the state does not grow).

    Sane: running logsumexp -inf ``[B, D]`` and LIF v, hist zeros ``[L, B, D]`` (float32).
    Faithful: ``{"pos"}`` only; the persistent state is read from the 'state' collection
    unless given (``faithful_state``).
    """
    del max_len
    pos = jnp.zeros((), jnp.int32)
    if config.mode == "faithful":
        return {"pos": pos}
    acc = jnp.promote_types(DTYPES[config.dtype], jnp.float32)
    layers = (config.num_layers, batch_size, config.dim)
    return {
        "pos": pos,
        "lse": jnp.full((batch_size, config.dim), -jnp.inf, acc),
        "v": jnp.zeros(layers, acc),
        "hist": jnp.zeros(layers, acc),
    }


def faithful_state(variables: dict[str, Any]) -> State:
    """A faithful decoding state that carries the persistent state of ``variables['state']``
    (so ``module.apply({'params': ...}, x, state)`` threads it from call to call)."""
    return {"pos": jnp.zeros((), jnp.int32), "persistent": dict(variables["state"])}


# ----------------------------------------------------------------------------- params


def _torch_uniform(fan_in: int) -> nn.initializers.Initializer:
    """torch nn.Linear init: U(-1/√fan_in, 1/√fan_in) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LinearParams(nn.Module):
    """A torch-initialised Linear's parameters ``{"kernel": [in, out], "bias": [out]}``
    (returned, not applied, so pure functions and ``lax.switch`` can use them)."""

    fan_in: int
    fan_out: int
    use_bias: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, Array]:
        init = _torch_uniform(self.fan_in)
        p = {"kernel": self.param("kernel", init, (self.fan_in, self.fan_out), self.param_dtype)}
        if self.use_bias:
            p["bias"] = self.param("bias", init, (self.fan_out,), self.param_dtype)
        return p


class NormParams(nn.Module):
    """LayerNorm parameters ``{"scale": ones [d], "bias": zeros [d]}`` (bias optional)."""

    dim: int
    use_bias: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, Array]:
        p = {"scale": self.param("scale", nn.initializers.ones, (self.dim,), self.param_dtype)}
        if self.use_bias:
            p["bias"] = self.param("bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
        return p


class Consciousness(nn.Module):
    """Parameters of the consciousness layer (names as the original's state dict)."""

    cfg: QLLMv3Config

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        c, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        d, faithful = c.dim, c.mode == "faithful"
        p: dict[str, Any] = {
            name: LinearParams(d, d, param_dtype=pdt, name=name)()
            for name in ("awareness_proj", "attention_proj", "memory_proj", "intention_proj")
        }
        p["consciousness_fusion"] = LinearParams(
            4 * d, d, param_dtype=pdt, name="consciousness_fusion"
        )()
        p["consciousness_norm"] = NormParams(
            d, use_bias=faithful, param_dtype=pdt, name="consciousness_norm"
        )()
        if faithful:
            p["global_consciousness"] = self.param(
                "global_consciousness", nn.initializers.normal(0.01), (1, 1, d), pdt
            )
        return p


class ShortTermMemory(nn.Module):
    cfg: QLLMv3Config

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        c, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        d, m = c.dim, c.memory_size
        p: dict[str, Any] = {
            "memory_slots": self.param("memory_slots", nn.initializers.normal(0.02), (m, d), pdt),
            "memory_update": LinearParams(2 * d, d, param_dtype=pdt, name="memory_update")(),
            "memory_gate": LinearParams(d, m, param_dtype=pdt, name="memory_gate")(),
            "memory_norm": NormParams(d, param_dtype=pdt, name="memory_norm")(),
        }
        if c.mode == "faithful":
            # Read by nothing in the forward (kept for strict state-dict loading).
            p["memory_weights"] = self.param("memory_weights", nn.initializers.zeros, (m,), pdt)
            p["decay_rate"] = self.param("decay_rate", nn.initializers.constant(0.95), (), pdt)
        return p


class LongTermMemory(nn.Module):
    cfg: QLLMv3Config

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        c, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        d, cd, k, e = c.dim, c.concept_dim, c.num_concepts, c.episodic_slots
        n002 = nn.initializers.normal(0.02)
        p: dict[str, Any] = {
            "concept_memory": self.param("concept_memory", n002, (k, cd), pdt),
            "episodic_memory": self.param("episodic_memory", n002, (e, d), pdt),
            "concept_embeddings": LinearParams(d, cd, param_dtype=pdt, name="concept_embeddings")(),
            "concept_retrieval": LinearParams(cd, d, param_dtype=pdt, name="concept_retrieval")(),
            "episodic_retrieval": LinearParams(d, d, param_dtype=pdt, name="episodic_retrieval")(),
        }
        if c.mode == "faithful":
            p["consolidation_gate"] = LinearParams(
                d, 1, param_dtype=pdt, name="consolidation_gate"
            )()
        return p


class SpikingNeuron(nn.Module):
    """Parameters of one spiking layer: its synaptic Linear (the membrane and history are
    state, not parameters)."""

    cfg: QLLMv3Config

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        d, pdt = self.cfg.dim, DTYPES[self.cfg.param_dtype]
        return {"synaptic_weights": LinearParams(d, d, param_dtype=pdt, name="synaptic_weights")()}


class Plasticity(nn.Module):
    """DP parameters: faithful = base + 3 expansion + 3 contraction Linears; sane = a
    pre-LN residual MLP (norm, up [D, rD], down [rD, D])."""

    cfg: QLLMv3Config

    @nn.compact
    def __call__(self) -> dict[str, Any]:
        c, pdt = self.cfg, DTYPES[self.cfg.param_dtype]
        d = c.dim
        if c.mode == "sane":
            f = c.mlp_ratio * d
            return {
                "mlp_norm": NormParams(d, param_dtype=pdt, name="mlp_norm")(),
                "mlp_up": LinearParams(d, f, param_dtype=pdt, name="mlp_up")(),
                "mlp_down": LinearParams(f, d, param_dtype=pdt, name="mlp_down")(),
            }
        names = ["base_transform"]
        names += [f"expansion_layers_{k}" for k in range(3)]
        names += [f"contraction_layers_{k}" for k in range(3)]
        return {n: LinearParams(d, d, param_dtype=pdt, name=n)() for n in names}


def sane_mlp(p: dict[str, Any], h: Array) -> Array:
    """h + down(gelu(up(LN(h)))) (exact erf GELU)."""
    y = ops.layer_norm(h, p["mlp_norm"]["scale"], p["mlp_norm"]["bias"])
    return h + ops.linear(p["mlp_down"], jax.nn.gelu(ops.linear(p["mlp_up"], y), approximate=False))


# ------------------------------------------------------------------------------ model


class QLLMv3(nn.Module):
    """The model; see the module docstring. Follows the ``ModelFamily`` call contract."""

    config: QLLMv3Config

    def _persistent(self) -> dict[str, Any]:
        """The 'state' collection variables (created at init)."""
        c = self.config
        acc = jnp.promote_types(DTYPES[c.param_dtype], jnp.float32)
        ll, d = c.num_layers, c.dim

        def membrane() -> Array:
            return 0.1 * jax.random.normal(self.make_rng("params"), (ll, d), acc)

        inits = {
            "membrane_potential": membrane,
            "spike_history": lambda: jnp.zeros((ll, d), acc),
            "memory_slots_delta": lambda: jnp.zeros((c.memory_size, d), acc),
            "episodic_memory_delta": lambda: jnp.zeros((c.episodic_slots, d), acc),
            "episodic_weights": lambda: jnp.zeros((c.episodic_slots,), acc),
            "usage_count": lambda: jnp.zeros((ll, c.max_dim), acc),
            "importance_scores": lambda: jnp.zeros((ll, c.max_dim), acc),
        }
        return {k: self.variable("state", k, fn) for k, fn in inits.items()}

    @nn.compact
    @applies_matmul_precision
    def __call__(
        self,
        inputs: Array,
        state: State | None = None,
        *,
        deterministic: bool = True,
        training_step: int | Array | None = None,
        local_learning: bool = False,
    ) -> ModelOutput:
        """inputs int ``[B, T]``, state None or ``init_state(...)`` -> ModelOutput.

        training_step: faithful only; when given in train mode, consolidation may fire.
        local_learning: stop gradients between layers and return every layer's logits in
          ``intermediates['layer_logits']`` ``[L, B, T, V]`` (the backprop-free objective).
        Per-stage tensors are sown into the 'intermediates' collection (parity checks).
        """
        c = self.config
        dt, pdt = DTYPES[c.dtype], DTYPES[c.param_dtype]
        embed = self.param(
            "token_embedding", nn.initializers.normal(1.0), (c.vocab_size, c.dim), pdt
        )
        params = {
            "consciousness": Consciousness(c, name="consciousness")(),
            "stm": ShortTermMemory(c, name="short_term_memory")(),
            "ltm": LongTermMemory(c, name="long_term_memory")(),
            "syn": [
                SpikingNeuron(c, name=f"spiking_neurons_{i}")()["synaptic_weights"]
                for i in range(c.num_layers)
            ],
            "dp": [
                Plasticity(c, name=f"developmental_plasticity_{i}")() for i in range(c.num_layers)
            ],
            "out": LinearParams(c.dim, c.vocab_size, param_dtype=pdt, name="output_proj")(),
        }
        params = jax.tree.map(lambda a: a.astype(dt) if a.ndim >= 2 else a, params)
        if c.mode == "faithful":
            # Unused by the forward (returned as "metrics" upstream); kept for loading.
            self.param("learning_efficiency", nn.initializers.constant(1.0), (), pdt)
            self.param("adaptation_rate", nn.initializers.constant(0.1), (), pdt)
        h0 = jnp.take(embed, inputs, axis=0).astype(dt)
        self.sow("intermediates", "embed", h0)
        if c.mode == "faithful":
            return self._faithful(params, h0, state, deterministic, training_step, local_learning)
        state = init_state(c, inputs.shape[0]) if state is None else state
        return self._sane(params, h0, state, local_learning)

    # ------------------------------------------------------------------------- sane

    def _sane(self, params: dict, h0: Array, state: State, local: bool) -> ModelOutput:
        c = self.config
        cp = params["consciousness"]
        states = ops.consciousness_states(cp, h0)
        w, lse = ops.causal_softmax_over_time(ops.consciousness_logits(cp, states), state["lse"])
        h = h0 * w.astype(h0.dtype) + h0
        stm, ltm = params["stm"], params["ltm"]
        vs, hists, layer_logits = [], [], []
        for i in range(c.num_layers):
            if local and i > 0:
                h = jax.lax.stop_gradient(h)
            h, _, _ = ops.stm_read(stm, h, stm["memory_slots"])
            h = h + 0.3 * ops.ltm_read(ltm, h, ltm["episodic_memory"])
            s = ops.linear(params["syn"][i], h)
            if c.spiking_kind == "lif":
                s, v, hist = ops.lif_scan(
                    s,
                    state["v"][i],
                    state["hist"][i],
                    decay=c.spike_decay,
                    threshold=c.spike_threshold,
                    refractory=c.refractory_threshold,
                    slope=c.surrogate_slope,
                )
            else:
                v, hist = state["v"][i], state["hist"][i]
            vs.append(v)
            hists.append(hist)
            h = sane_mlp(params["dp"][i], s)
            if local:
                layer_logits.append(ops.linear(params["out"], h))
        logits = ops.linear(params["out"], h)
        new_state = {
            "pos": state["pos"] + h0.shape[1],
            "lse": lse,
            "v": jnp.stack(vs),
            "hist": jnp.stack(hists),
        }
        inter = {"layer_logits": jnp.stack(layer_logits)} if local else None
        return ModelOutput(
            logits=logits,
            phase_states=None,
            coupling_loss=jnp.zeros((), jnp.float32),
            state=new_state,
            intermediates=inter,
        )

    # --------------------------------------------------------------------- faithful

    def _faithful(
        self,
        params: dict,
        h0: Array,
        state: State | None,
        deterministic: bool,
        training_step: Any,
        local: bool,
    ) -> ModelOutput:
        c = self.config
        train = not deterministic
        given = None if state is None else state.get("persistent")
        if given is None and not (
            self.is_mutable_collection("state") or self.has_variable("state", "spike_history")
        ):
            raise ValueError(
                "qllm_v3 faithful mode needs its persistent state: apply with the 'state' "
                "collection (mutable=['state']) or a faithful_state(...) decoding state; "
                "the shared trainer supports mode='sane'"
            )
        # With the persistent state given (generation) the collection need not exist.
        variables = (
            self._persistent()
            if given is None or self.has_variable("state", "spike_history")
            else {}
        )
        cur = dict(given) if given is not None else {k: v.value for k, v in variables.items()}
        sg = jax.lax.stop_gradient
        cp = params["consciousness"]
        states = ops.consciousness_states(cp, h0)
        norm = ops.consciousness_logits(cp, states)
        self.sow("intermediates", "consciousness/states", states)
        self.sow("intermediates", "consciousness/norm", norm)
        w = ops.softmax_over_time(norm + 0.1 * cp["global_consciousness"].astype(norm.dtype))
        h = h0 * w.astype(h0.dtype) + h0
        self.sow("intermediates", "consciousness/out", h)

        stm, ltm = params["stm"], params["ltm"]
        slots_param = stm["memory_slots"]
        delta = cur["memory_slots_delta"]
        episodic = ltm["episodic_memory"] + sg(cur["episodic_memory_delta"]).astype(h.dtype)
        mem, hist = list(cur["membrane_potential"]), list(cur["spike_history"])
        usage, imp = list(cur["usage_count"]), list(cur["importance_scores"])
        layer_logits = []
        for i in range(c.num_layers):
            if local and i > 0:
                h = sg(h)
            slots = slots_param + sg(delta).astype(slots_param.dtype)
            tag = f"layer/{i}/"
            self.sow("intermediates", tag + "stm_in", h)
            stm_out, gates, gate_logits = ops.stm_read(stm, h, slots)
            self.sow("intermediates", tag + "stm_gate_logits", gate_logits)
            self.sow("intermediates", tag + "stm_out", stm_out)
            if train:
                new_slots = ops.stm_ema(sg(slots), sg(gates), sg(h), sg(stm["decay_rate"]))
                delta = new_slots - sg(slots_param).astype(new_slots.dtype)
                self.sow("intermediates", tag + "stm_slots_after", new_slots)
            ltm_out = ops.ltm_read(ltm, stm_out, episodic)
            self.sow("intermediates", tag + "ltm_out", ltm_out)
            s = ops.linear(params["syn"][i], stm_out + 0.3 * ltm_out)
            self.sow("intermediates", tag + "synaptic", s)
            out, mem[i], hist[i], spikes, mask = ops.global_spike_step(
                sg(s),
                mem[i],
                hist[i],
                decay=c.spike_decay,
                threshold=c.spike_threshold,
                refractory=c.refractory_threshold,
            )
            out = s * (1.0 - mask).astype(s.dtype)  # the mask carries no gradient
            self.sow("intermediates", tag + "spike_out", out)
            self.sow("intermediates", tag + "spikes", spikes.astype(jnp.int32))
            self.sow("intermediates", tag + "refractory_mask", mask.astype(jnp.int32))
            kappa = ops.dp_complexity(sg(out))
            branch = ops.dp_branch(kappa)
            h = ops.dp_apply(params["dp"][i], out, branch)
            self.sow("intermediates", tag + "dp_kappa", kappa)
            self.sow("intermediates", tag + "branch", branch)
            self.sow("intermediates", tag + "dp_out", h)
            if train:
                usage[i], imp[i] = ops.dp_counters(usage[i], imp[i], branch, kappa)
            if local:
                layer_logits.append(ops.linear(params["out"], h))
        logits = ops.linear(params["out"], h)
        ep_mem, ep_w = cur["episodic_memory_delta"], cur["episodic_weights"]
        if train and training_step is not None:
            ep_mem, ep_w = self._consolidate(ltm, sg(h), ep_mem, ep_w)
        new = {
            "membrane_potential": jnp.stack(mem),
            "spike_history": jnp.stack(hist),
            "memory_slots_delta": delta,
            "episodic_memory_delta": ep_mem,
            "episodic_weights": ep_w,
            "usage_count": jnp.stack(usage),
            "importance_scores": jnp.stack(imp),
        }
        if variables and self.is_mutable_collection("state") and not self.is_initializing():
            for k, var in variables.items():
                var.value = new[k]
        pos = jnp.zeros((), jnp.int32) if state is None else state["pos"]
        inter = {"layer_logits": jnp.stack(layer_logits)} if local else None
        return ModelOutput(
            logits=logits,
            phase_states=None,
            coupling_loss=jnp.zeros((), jnp.float32),
            state={"pos": pos + h0.shape[1], "persistent": new},
            intermediates=inter,
        )

    def _consolidate(
        self, ltm: dict, h: Array, ep_delta: Array, ep_w: Array
    ) -> tuple[Array, Array]:
        """Consolidation (forward step 5): fires iff mean(mean_D |h|) > 0.8."""
        importance = jnp.mean(jnp.abs(h.astype(ops.acc_dtype(h))), -1)
        fire = jnp.mean(importance) > 0.8
        base = ltm["episodic_memory"]
        table, weights = ops.consolidate(
            ltm["consolidation_gate"], h, importance, base + ep_delta.astype(base.dtype), ep_w
        )
        self.sow("intermediates", "consolidated", fire)
        new_delta = jnp.where(fire, table - base.astype(table.dtype), ep_delta)
        return jax.lax.stop_gradient(new_delta), jnp.where(fire, weights, ep_w)


def consciousness_weights(params: dict[str, Any], inputs: Array) -> Array:
    """``get_consciousness_state``'s weights: mean_T h₁ ``[B, D]`` (touches no state).

    params: the 'params' collection of a faithful or sane model; inputs int ``[B, T]``.
    """
    cp = params["consciousness"]
    h0 = jnp.take(params["token_embedding"], inputs, axis=0)
    norm = ops.consciousness_logits(cp, ops.consciousness_states(cp, h0))
    if "global_consciousness" in cp:
        w = ops.softmax_over_time(norm + 0.1 * cp["global_consciousness"])
    else:
        lse0 = jnp.full((h0.shape[0], h0.shape[2]), -jnp.inf, ops.acc_dtype(h0))
        w, _ = ops.causal_softmax_over_time(norm, lse0)
    return jnp.mean(h0 * w.astype(h0.dtype) + h0, 1)


def generate_faithful(
    module: QLLMv3,
    variables: dict[str, Any],
    prompt: Array,
    key: Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
) -> tuple[Array, dict[str, Any]]:
    """Faithful-mode sampling with the persistent state threaded through every call, as
    the original's generation does (each call mutates the spiking state, in eval too).

    prompt int ``[B, T]`` -> (new tokens ``[B, max_new_tokens]``, persistent state after).
    The prompt is one call, then one call per generated token; temperature 0 is greedy.
    """
    if module.config.mode != "faithful":
        raise ValueError("generate_faithful needs mode='faithful'; use qpf.generation")
    params = {"params": variables["params"]}
    out = module.apply(params, prompt, faithful_state(variables))

    def pick(logits: Array, k: Array) -> Array:
        if temperature == 0:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(k, logits / temperature).astype(jnp.int32)

    def body(carry, k):
        logits, state = carry
        tok = pick(logits, k)
        nxt = module.apply(params, tok[:, None], state)
        return (nxt.logits[:, -1], nxt.state), tok

    keys = jax.random.split(key, max_new_tokens)
    (_, state), toks = jax.lax.scan(body, (out.logits[:, -1], out.state), keys)
    return toks.T, state["persistent"]


# --------------------------------------------------------------------------- presets

# name: (vocab, dim, layers, memory, concept_dim, concepts, batch, lr).
# The original's configs (create_brain_inspired_model: M 64, C 256, K 1024):
# train_brain_llm.py defaults (16,420,584 params with the state tensors) and
# simple_train.py defaults (3,342,923). lr 1e-3 as simple_train's AdamW.
_FAITHFUL = {
    "original": (256, 512, 6, 64, 256, 1024, 8, 1e-3),
    "original-simple": (99, 256, 4, 64, 256, 1024, 8, 1e-3),
}
# Sane presets sized to the transformer presets' parameter counts (within 4%; the vocab
# tables dominate the GPT-2 ones); batch sizes and learning rates as the transformer's.
_SANE = {
    "tiny": (50257, 128, 4, 64, 64, 256, 16, 1e-3),
    "small": (50257, 512, 6, 64, 256, 1024, 8, 6e-4),
    "tiny-byte": (259, 128, 4, 64, 128, 512, 32, 1e-3),
    "small-byte": (259, 448, 9, 64, 256, 1024, 16, 6e-4),
    "test": (259, 16, 2, 7, 11, 13, 4, 1e-3),
}


def _preset(name: str) -> Preset:
    faithful = name in _FAITHFUL
    vocab, dim, layers, mem, cdim, nconc, batch, lr = (_FAITHFUL if faithful else _SANE)[name]
    extra = {"episodic_slots": 17, "max_dim": 5} if name == "test" else {}
    model = QLLMv3Config(
        vocab_size=vocab,
        dim=dim,
        num_layers=layers,
        memory_size=mem,
        concept_dim=cdim,
        num_concepts=nconc,
        mode="faithful" if faithful else "sane",
        **extra,
    )
    return Preset(name=name, model=model, batch_size=batch, learning_rate=lr)


PRESETS: dict[str, Preset] = {name: _preset(name) for name in (*_FAITHFUL, *_SANE)}

QLLM_V3_FAMILY = ModelFamily(
    name="qllm_v3",
    config_cls=QLLMv3Config,
    build=lambda config: QLLMv3(config=config),
    init_state=init_state,
    presets=PRESETS,
)
