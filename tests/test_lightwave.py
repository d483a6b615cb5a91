"""LLM Lightwave family: parity with the original PyTorch code, decoding, gradients.

Parity tests load ``lightwave_*.npz`` / ``module_*.npz`` from the fixture root's
``lightwave`` folder (by pattern) and compare every stored key in float32 and in float64
at the fixture README's tolerances, reporting every failing key.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_files
from lightwave_parity import F32, F64, Report, config_json, load, model_params, pairs

from qpf.config import ConfigError
from qpf.generation import generate
from qpf.generation.original_beam import OriginalBeamConfig, original_beam_search
from qpf.models import lightwave as lw
from qpf.models import lightwave_weights as lww
from qpf.ops.sampling import SamplingConfig
from qpf.zoo import get_family, resolve_model

EOT = 50256


def _x64(dtype: str):
    return jax.enable_x64(dtype == "float64")


# ------------------------------------------------------------------ full-model parity


def _logit_stats(logits: np.ndarray, ids: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
    lg = np.asarray(logits, np.float64)[:, :-1]
    srt = np.sort(lg, axis=-1)
    m = srt[..., -1]
    lse = m + np.log(np.exp(lg - m[..., None]).sum(-1))
    return {
        "logits_sel": lg[..., cols],
        "logits_target": np.take_along_axis(lg, ids[:, 1:, None], -1)[..., 0],
        "logits_max": m,
        "logits_lse": lse,
        "logits_argmax": np.argmax(lg, -1),
    }


def _check_case(rep: Report, z: dict, case: str, out, losses, f64: bool) -> None:
    tol = F64 if f64 else F32
    ids = z[f"{case}/input_ids"]
    t = ids.shape[1]
    inter = {k: np.asarray(v) for k, v in out.intermediates.items()}
    mine = {
        "embed": inter["embed"],
        "layer_in": inter["layer_in"],
        "layer_out": inter["layer_out"],
        "pre_ln": inter["pre_ln"],
        "step_state": inter["step_state"],
        "mod_out": inter["mod_out"],
        "mod_out_last": inter["mod_out"][:, :, :, -1],
    }
    if "attn" in inter:
        mine["attn"] = inter["attn"][..., : t - 1]
        mine["attn_lastpos"] = inter["attn"][:, :, t - 1, ..., : t - 1]
    mine.update(_logit_stats(out.logits, ids, z[f"{case}/logit_cols"]))
    for key, val in mine.items():
        name = f"{case}/{key}"
        if name not in z:
            continue
        if key == "logits_argmax":
            rep.equal(name, val, z[name])
            continue
        # Keys without an f64/ copy are checked against the float32 run at its tolerance.
        ref = f"f64/{name}" if f64 and f"f64/{name}" in z else name
        rep.close(
            ref, val, z[ref], tol["state"] if ref.startswith("f64/") or not f64 else F32["state"]
        )
    loss_map = {
        "train_ce": losses["ce"],
        "val_sum": losses["val_sum"],
        "val_avg": losses["val_avg_original"],
        "val_ppl": losses["val_ppl_original"],
    }
    for key, val in loss_map.items():
        name = f"{case}/loss/{key}"
        ref = f"f64/{name}" if f64 else name
        rep.close(ref, val, z[ref], tol["loss"])
    rep.equal(f"{case}/num_targets", losses["num_targets"], z[f"{case}/num_targets"])
    rep.equal(
        f"{case}/num_nonpad_targets", losses["num_real_targets"], z[f"{case}/num_nonpad_targets"]
    )


def _check_greedy(rep: Report, z: dict, module, params, fwd, f64: bool) -> None:
    """The shared sampler at temperature 0 reproduces the original's greedy continuation.

    The step statistics come from one (causal) forward over the continuation, padded to the
    shape of a compiled case so no new compilation is needed.
    """
    tol = F64 if f64 else F32
    ids = z["gen/ids"]
    n = z["gen/step_logit_max"].shape[0]
    prompt = ids[: len(ids) - n]
    res = generate(
        module,
        params,
        jnp.asarray(prompt[None]),
        jax.random.key(0),
        max_new_tokens=n,
        config=SamplingConfig(temperature=0.0),
        eos_id=EOT,
        pad_id=EOT,
    )
    got = np.asarray(res.tokens[0, : int(res.lengths[0])])
    rep.equal("gen/ids", np.concatenate([prompt, got]), ids)
    # Step statistics from one forward pass over the whole continuation.
    shape = max((z[k].shape for k in z if k.endswith("/input_ids")), key=lambda s: s[1])
    padded = np.full(shape, EOT, np.int32)
    padded[:, : len(ids)] = ids
    lg = np.asarray(fwd(params, jnp.asarray(padded)).logits[0], np.float64)
    lg = lg[len(prompt) - 1 : len(ids) - 1]
    srt = np.sort(lg, -1)
    stats = {
        "step_logit_max": srt[:, -1],
        "step_logit_lse": srt[:, -1] + np.log(np.exp(lg - srt[:, -1:]).sum(-1)),
        "step_top2_gap": srt[:, -1] - srt[:, -2],
    }
    for key, val in stats.items():
        ref = f"f64/gen/{key}" if f64 else f"gen/{key}"
        rep.close(ref, val, z[ref], tol["score"])


def _padded(seqs: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(seqs), width), -1, np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def _check_beam(rep: Report, z: dict, module, params, f64: bool) -> None:
    """The original's beam search: every step's live beams, finished beams, final ranking."""
    tol = F64 if f64 else F32
    kw = json.loads(str(z["meta_json"]))["beam"]["kwargs"]
    config = OriginalBeamConfig(
        width=kw["beam_width"],
        max_new_tokens=kw["max_new"],
        temperature=kw["temperature"],
        length_penalty=kw["length_penalty"],
        min_length=kw["min_length"],
    )
    n_gen = z["gen/step_logit_max"].shape[0]
    prompt = [int(t) for t in z["gen/ids"][: len(z["gen/ids"]) - n_gen]]
    res = original_beam_search(module, params, prompt, config, eos_id=EOT)
    width = z["beam/final_ids"].shape[1]
    rep.equal("beam/final_ids", _padded(res.final_ids, width), z["beam/final_ids"])
    rep.equal("beam/final_finished", res.final_finished, z["beam/final_finished"])
    best = z["beam/best_ids"]
    rep.equal("beam/best_ids", res.best_ids, best[best >= 0])
    steps = np.stack([_padded(s, width) for s in res.step_ids]) if res.step_ids else None
    rep.equal("beam/step_ids", steps, z["beam/step_ids"])
    for key, val in [
        ("final_raw_score", res.final_raw_score),
        ("final_norm_score", res.final_norm_score),
        ("step_score", np.asarray(res.step_score)),
    ]:
        ref = f"f64/beam/{key}" if f64 else f"beam/{key}"
        rep.close(ref, val, z[ref], tol["score"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lightwave_model_parity(dtype):
    for path in fixture_files("lightwave", "lightwave_*.npz"):
        z = load(path)
        rep = Report(f"{path.name} {dtype}")
        with _x64(dtype):
            cfg, params = model_params(z, dtype)
            module = lw.Lightwave(cfg)
            fwd = jax.jit(lambda p, ids, m=module: m.apply(p, ids, collect=True))
            cases = sorted({k.split("/")[0] for k in z if k.endswith("/input_ids")})
            for case in cases:
                ids = jnp.asarray(z[f"{case}/input_ids"])
                out = fwd(params, ids)
                losses = {k: np.asarray(v) for k, v in lw.lightwave_losses(out.logits, ids).items()}
                _check_case(rep, z, case, out, losses, dtype == "float64")
            if "gen/ids" in z:
                _check_greedy(rep, z, module, params, fwd, dtype == "float64")
            if "beam/final_ids" in z:
                _check_beam(rep, z, module, params, dtype == "float64")
        rep.check()


# ------------------------------------------------------------------ module parity


def _layer_call(cfg, lp, call: dict, name: str):
    cand = jnp.asarray(pairs(call[f"{name}/candidate"]), cfg.dtype)
    cache = jnp.asarray(pairs(call[f"{name}/cache"]), cfg.dtype)  # [P, Bc, D, 2]
    pos = int(call[f"{name}/pos"])
    p_len = cache.shape[0]
    has_past = jnp.asarray(p_len > 0)
    acc = cand.dtype
    if cfg.mode == "wave":
        last = cache[-1] if p_len else jnp.zeros_like(cand)
        ctx = {"last": last}
    else:
        if p_len:
            positions = jnp.arange(pos - p_len, pos)[:, None]
            k, v = lw.project_cache_entry(lp, cache, positions, cfg)
            k, v = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)
            valid = jnp.ones((p_len,), bool)
        else:
            k = v = jnp.zeros((cand.shape[0], 1, cfg.dim, 2), acc)
            valid = jnp.zeros((1,), bool)
        ctx = {"keys": k, "values": v, "valid": valid}
    evolve = jax.jit(lw.layer_evolve, static_argnames=("config", "collect"))
    out, det = evolve(lp, cand, ctx, has_past, config=cfg, collect=True)
    got = {"output": out, "step_state": det["step_state"], "mod_out": det["mod_out"]}
    if "attn" in det:
        got["attn"] = det["attn"][..., :p_len]
    return got


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lightwave_layer_module_parity(dtype):
    for path in fixture_files("lightwave", "module_layer_*.npz"):
        z = load(path)
        rep = Report(f"{path.name} {dtype}")
        meta = config_json(z)
        with _x64(dtype):
            cfg = lww.config_from_torch(
                {"kwargs": meta["kwargs"]}, num_layers=1, dtype=dtype, param_dtype=dtype
            )
            sd = lww.TorchState(lww.load_fixture_params(z), np.dtype(dtype))
            lp = lww.layer_from_torch(sd, "", cfg)
            sd.check_all_used()
            lp = jax.tree.map(jnp.asarray, lp)
            for call in meta["calls"]:
                name = call["name"]
                got = _layer_call(cfg, lp, {k: v for k, v in z.items()}, name)
                for key, val in got.items():
                    ref = f"f64/{name}/{key}" if dtype == "float64" else f"{name}/{key}"
                    rep.close(ref, val, z[ref], (F64 if dtype == "float64" else F32)["state"])
        rep.check()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lightwave_loralinear_module_parity(dtype):
    for path in fixture_files("lightwave", "module_loralinear*.npz"):
        z = load(path)
        kw = config_json(z)["kwargs"]
        rep = Report(f"{path.name} {dtype}")
        tol = (F64 if dtype == "float64" else F32)["state"]
        f64 = dtype == "float64"
        with _x64(dtype):
            sd = lww.TorchState(lww.load_fixture_params(z), np.dtype(dtype))
            p = jax.tree.map(jnp.asarray, lww.lora_linear_from_torch(sd, "").copy())
            x = jnp.asarray(z["input"], dtype)
            base = {"lora_alpha": float(kw["alpha"]), "dtype": dtype, "param_dtype": dtype}
            quant = lw.LightwaveConfig(quant_bits=kw["quant_bits"], **base)
            plain = lw.LightwaveConfig(**base)
            got = {
                "output": lw.lora_linear(p, x, quant),
                "output_noquant": lw.lora_linear(p, x, plain),
                "weight_quantized": lw.fake_quantize(p["kernel"], kw["quant_bits"]).T,
                "bias_quantized": lw.fake_quantize(p["bias"], kw["quant_bits"]),
            }
            for key, val in got.items():
                ref = f"f64/{key}" if f64 else key
                rep.close(ref, val, z[ref], tol)
        rep.check()


# ------------------------------------------------------------------ behaviour


@pytest.fixture(scope="module", params=["test", "test-wave", "test+uniform"])
def small_model(request):
    """(module, params, ids [2, 12], jitted forward (params, ids, state|None) -> output).

    ``test+uniform``: the test preset with the §1.9 uniform-aggregation modulator (3 heads,
    which need not divide D there)."""
    name, _, variant = request.param.partition("+")
    config = get_family("lightwave").preset(name).model
    if variant == "uniform":
        config = config.replace(aggregation="uniform", num_heads=3)
    module = lw.Lightwave(config)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    params = jax.jit(module.init)(jax.random.key(0), ids[:, :2])
    fwd = jax.jit(lambda p, x, s=None: module.apply(p, x, s))
    return module, params, ids, fwd


def test_lightwave_decode_equals_forward(small_model):
    module, params, ids, fwd = small_model
    full = fwd(params, ids).logits
    state = lw.init_state(module.config, ids.shape[0], 16)
    pieces = []
    for a in range(0, 12, 4):  # equal chunks: one compilation
        out = fwd(params, ids[:, a : a + 4], state)
        pieces.append(out.logits)
        state = out.state
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert int(state["pos"]) == ids.shape[1]
    # A chunk that does not fit the cache buffer gives NaN logits (neural mode's buffer).
    if module.config.mode == "neural":
        over = fwd(params, ids[:, :4], lw.init_state(module.config, ids.shape[0], 3))
        assert np.all(np.isnan(over.logits))


def test_lightwave_causal(small_model):
    module, params, ids, fwd = small_model
    other = ids.at[:, 6:].set((ids[:, 6:] + 1) % module.config.vocab_size)
    a, b = fwd(params, ids).logits, fwd(params, other).logits
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_lightwave_every_parameter_gets_gradient(small_model):
    module, params, _, _ = small_model
    # Longer than rel_max_dist (3) so every bias row is read.
    vocab = module.config.vocab_size
    ids = jnp.arange(2 * 12).reshape(2, 12) * 7 % vocab

    def loss(p):
        return lw.lightwave_losses(module.apply(p, ids).logits, ids, pad_id=-1)["ce"]

    grads = jax.jit(jax.grad(loss))(params)
    used = np.zeros(vocab, bool)
    used[np.asarray(ids)] = True
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        name = jax.tree_util.keystr(path)
        if "embed" in name:
            g = g[used]  # rows of unseen tokens get none
        if g.ndim >= 2 and "embed" not in name and "kernel" not in name:
            assert np.all(np.abs(g).reshape(g.shape[0], -1).sum(1) > 0), name  # each row
        assert np.any(g != 0), name


def test_lightwave_losses_denominators():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    ids = jnp.asarray([[1, 2, 6, 6, 6], [3, 4, 5, 1, 6]])
    got = lw.lightwave_losses(logits, ids, pad_id=6)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(ids[:, 1:, None]), -1)[..., 0]
    real = np.asarray(ids[:, 1:] != 6)
    np.testing.assert_allclose(got["val_avg"], nll[real].mean(), rtol=1e-6)
    np.testing.assert_allclose(got["val_avg_original"], nll[real].sum() / 8, rtol=1e-6)
    assert float(got["num_real_targets"]) == 4


def test_lightwave_config_validation():
    with pytest.raises(ConfigError, match="num_heads"):
        lw.LightwaveConfig(mode="neural", dim=6, num_heads=4)
    with pytest.raises(ConfigError, match="quant_bits"):
        lw.LightwaveConfig(quant_bits=1)
    with pytest.raises(ConfigError, match="coin"):
        lw.LightwaveConfig(mode="neural", coin="fixed")
    with pytest.raises(ConfigError, match="quant_ste"):
        lw.LightwaveConfig(quant_ste=True)
    with pytest.raises(ConfigError, match="aggregation"):
        lw.LightwaveConfig(aggregation="uniform")  # wave mode has no aggregation
    with pytest.raises(ConfigError, match="aggregation"):
        lw.LightwaveConfig(mode="neural", aggregation="mean")
    lw.LightwaveConfig(mode="neural", dim=6, num_heads=4, aggregation="uniform")  # any H


def test_lightwave_presets_match_transformer_sizes():
    from qpf.models.param_count import family_param_count

    for name in ("tiny", "small"):
        fam, preset = resolve_model(f"lightwave:{name}")
        tfam, tpreset = resolve_model(f"transformer:{name}")
        mine = family_param_count(fam, preset.model)
        ref = family_param_count(tfam, tpreset.model)
        assert abs(mine / ref - 1) < 0.04, (name, mine, ref)


def test_lightwave_quantization_ste_passes_gradient():
    cfg = lw.LightwaveConfig(quant_bits=4)
    p = {
        "kernel": jax.random.normal(jax.random.key(0), (6, 5)),
        "bias": jax.random.normal(jax.random.key(1), (5,)),
    }
    x = jax.random.normal(jax.random.key(2), (3, 6))

    def grad(config):
        return jax.jit(jax.grad(lambda q: jnp.sum(lw.lora_linear(q, x, config) ** 2)))(p)["kernel"]

    plain = grad(cfg)
    ste = grad(cfg.replace(quant_ste=True))
    # round() has zero derivative: without STE only the scale's max element gets gradient.
    assert np.count_nonzero(np.asarray(plain)) <= 1
    assert np.count_nonzero(np.asarray(ste)) == ste.size
    q = lw.fake_quantize(p["kernel"], 4)
    levels = np.asarray(q) / (np.abs(np.asarray(p["kernel"])).max() / 7)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert levels.min() >= -8
    assert levels.max() <= 7


def _shift_sum(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u_s = np.concatenate([v[..., :1], u[..., :-1]], -1)
    v_s = np.concatenate([v[..., 1:], u[..., -1:]], -1)
    return u_s + v_s


@pytest.mark.parametrize("coin", ["splitter", "fixed"])
def test_lightwave_wave_step_matches_complex_reference(coin):
    """One wave-mode step against numpy complex arithmetic (the fixed coin is the earlier
    variant: (c/√2)[[1, i], [i, 1]] with the (1 − c)·z residual)."""
    rng = np.random.default_rng(0)
    b, d = 3, 7
    z = rng.normal(size=(b, d)) + 1j * rng.normal(size=(b, d))
    last = rng.normal(size=(1, d)) + 1j * rng.normal(size=(1, d))
    pu, pv, c = rng.normal(size=d), rng.normal(size=d), 0.3
    u, v = last * np.exp(1j * pu), z * np.exp(1j * pv)
    if coin == "splitter":
        r, t = np.sqrt(c), np.sqrt(1 - c)
        want = _shift_sum(t * u + 1j * r * v, 1j * r * u + t * v)
    else:
        k = c / np.sqrt(2)
        want = _shift_sum(k * (u + 1j * v), k * (1j * u + v)) + (1 - c) * z
    got = lw.wave_modulate(
        jnp.asarray(pairs(z), jnp.float32),
        jnp.asarray(pairs(last), jnp.float32),
        jnp.float32(c),
        jnp.asarray(pu, jnp.float32),
        jnp.asarray(pv, jnp.float32),
        coin,
    )
    np.testing.assert_allclose(np.asarray(got), pairs(want), rtol=1e-5, atol=1e-5)


def test_lightwave_uniform_modulator_matches_the_spec_formula():
    """§1.9: Mod(z) = out_proj(mean_j concat_h tanh(W_h realview([z, z_j]) + b_h)) + mean_j β_j,
    over the valid cache slots only, computed here per j in numpy from the whole weights."""
    rng = np.random.default_rng(3)
    b, d, h, s, r = 2, 5, 3, 7, 4
    config = lw.LightwaveConfig(
        vocab_size=11, dim=d, num_heads=h, mode="neural", aggregation="uniform", rel_max_dist=r
    )
    params = lw.ModulatorNeuralParams(config).init(jax.random.key(0))["params"]
    params = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(x.dtype), params)
    z = rng.normal(size=(b, d, 2)).astype(np.float32)
    cache = rng.normal(size=(b, s, d, 2)).astype(np.float32)
    valid = np.arange(s) < 5
    keys, biases = lw.project_cache_entry(
        {"modulator": params}, jnp.asarray(cache), jnp.arange(s)[None, :], config
    )
    got = lw.uniform_modulate(params, jnp.asarray(z), keys, biases, jnp.asarray(valid), config)

    w, bias = np.asarray(params["heads"]["kernel"]), np.asarray(params["heads"]["bias"])
    feats = [
        np.tanh(np.concatenate([z.reshape(b, 2 * d), cache[:, j].reshape(b, 2 * d)], -1) @ w + bias)
        for j in range(s)
        if valid[j]
    ]
    mean = np.mean(feats, axis=0)
    o = mean @ np.asarray(params["out_proj"]["kernel"]) + np.asarray(params["out_proj"]["bias"])
    table = np.asarray(params["rel_bias"]["table"])[:, 0]  # [R+1, 2]
    beta = np.mean([table[min(j, r)] for j in range(s) if valid[j]], axis=0)
    want = o.reshape(b, d, 2) + beta
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_lightwave_loader_rejects_unknown_and_missing_names():
    cfg = lw.LightwaveConfig(vocab_size=7, dim=2, num_layers=1, num_steps=2, rel_max_dist=2)
    sd = {
        "token_embed.embed.weight": np.zeros((7, 2), np.float32),
        "token_embed.imag_embed.weight": np.zeros((7, 2), np.float32),
        "pos_bias.bias": np.zeros((5, 2), np.complex64),
        "layers.0.coupling": np.zeros(2, np.float32),
        "layers.0.norm_scale": np.ones((), np.float32),
        "layers.0.modulator.phase_u": np.zeros((2, 2), np.float32),
        "layers.0.modulator.phase_v": np.zeros((2, 2), np.float32),
        "readout.proj.weight": np.zeros((7, 4), np.float32),
        "readout.proj.bias": np.zeros(7, np.float32),
    }
    params = lww.params_from_torch(sd, cfg)
    assert params["params"]["pos_bias"]["table"].shape == (3, 2, 2)
    with pytest.raises(ValueError, match="unused torch parameters"):
        lww.params_from_torch({**sd, "extra.weight": np.zeros(1)}, cfg)
    with pytest.raises(KeyError, match=r"readout\.proj\.bias"):
        lww.params_from_torch({k: v for k, v in sd.items() if k != "readout.proj.bias"}, cfg)


def test_lightwave_original_beam_scores_are_path_logprobs():
    """Neural-mode beam search runs (the original's fails) and every live beam's raw score
    is Σ log(p + 1e-12) of its tokens at the beam temperature, from one full forward."""
    cfg = get_family("lightwave").preset("test").model
    module = lw.Lightwave(cfg)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    prompt = [3, 14, 15]
    config = OriginalBeamConfig(width=2, max_new_tokens=3, min_length=3, repeat_threshold=99)
    res = original_beam_search(module, params, prompt, config, eos_id=cfg.vocab_size - 1)
    assert len(res.step_ids) == 3
    for ids, score in zip(res.step_ids[-1], res.step_score[-1], strict=True):
        logits = module.apply(params, jnp.asarray([ids])).logits[0] / 0.7
        logits = logits.at[:, cfg.vocab_size - 1].set(-jnp.inf)  # EOT masked before min_length
        probs = np.asarray(jax.nn.softmax(logits, -1))
        want = sum(
            float(np.log(np.float32(probs[t - 1, ids[t]] + 1e-12))) for t in range(3, len(ids))
        )
        np.testing.assert_allclose(score, want, rtol=1e-5)
