"""Figures of a Wave-Native GPT (family ``wavegpt``), as the original's benchmark drew them.

    python -m experiments.wave_plots --run-dir RUN [--out DIR] [--which latest|best]
    python -m experiments.wave_plots --preset test --out DIR      # a fresh (untrained) model

Writes PNGs (matplotlib) and ``generation.gif`` (Pillow) into DIR (default RUN/plots):
learning_curve, frequencies (base-frequency heatmap + histogram), phases (heatmap),
harmonics (mean |A| per wave; |A| by harmonic number against 1/n), wave_packets (tokens
0, 1, 10, 50, 100, 500 that exist), attention (τ per layer against √W, or the pure-wave
interference scales), polar_phases, complex_plane (A·cos φ vs A·sin φ; frequency vs phase),
spectrogram (200 tokens × 100 frequency bins on [0, 10)), interference (token pairs
(0, 1), (10, 11), (50, 100) and their superposition), and generation.gif (per step: top-10
next-token probabilities and the superposed waves of the top-5 tokens).

As in the original (spec §2.12), the drawn "waves" are Σ_h A_h·sin(f·h·t + φ) over a time t
that the model itself never uses (its embedding only has phase offsets 2π·f·h + φ + p·ω).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

PACKET_TOKENS = (0, 1, 10, 50, 100, 500)
PAIRS = ((0, 1), (10, 11), (50, 100))


def wave_tables(params: dict) -> dict[str, np.ndarray]:
    """The embedding tables as numpy: base_freqs/phases [V, W], amps [V, W, Hh], pos_freq [W]."""
    emb = params["embedding"]
    return {
        "freqs": np.asarray(emb["base_freqs"], np.float64),
        "phases": np.asarray(emb["phases"], np.float64),
        "amps": np.asarray(emb["harmonic_amps"], np.float64),
        "pos_freq": np.asarray(emb["pos_freq"], np.float64).reshape(-1),
    }


def token_wave(tab: dict, token: int, t: np.ndarray, waves: int = 8) -> np.ndarray:
    """Σ_{w<waves, h} A·sin(f·h·t + φ) of one token (the original's drawn signal)."""
    f = tab["freqs"][token, :waves, None, None]
    phi = tab["phases"][token, :waves, None, None]
    amp = tab["amps"][token, :waves, :, None]
    h = np.arange(1, amp.shape[1] + 1)[None, :, None]
    return np.sum(amp * np.sin(f * h * t[None, None, :] + phi), axis=(0, 1))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_learning_curve(records: Sequence[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    # Trainer runs log "train/loss"; in-process loops may log "loss".
    train = [(r["step"], r.get("train/loss", r.get("loss"))) for r in records]
    train = [(s, v) for s, v in train if v is not None]
    val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    if train:
        s, v = np.array(train).T
        ax.plot(s, v, alpha=0.35, label="train loss")
        k = min(50, len(v))
        ax.plot(s[k - 1 :], np.convolve(v, np.ones(k) / k, "valid"), label=f"{k}-step average")
    if val:
        s, v = np.array(val).T
        ax.plot(s, v, "o-", label="validation CE")
    ax.set(xlabel="optimizer step", ylabel="loss (nats)", title="Learning curve")
    ax.legend() if train or val else ax.text(0.5, 0.5, "no training records", ha="center")
    return _save(fig, path)


def plot_frequencies(tab: dict, path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    im = a.imshow(tab["freqs"][:100].T, aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=a, label="base frequency")
    a.set(xlabel="token id", ylabel="wave index", title="Base frequencies (first 100 tokens)")
    b.hist(tab["freqs"].ravel(), bins=50, color="tab:blue")
    b.set(xlabel="base frequency", ylabel="count", title="Base-frequency histogram")
    return _save(fig, path)


def plot_phases(tab: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    im = ax.imshow(np.mod(tab["phases"][:100], 2 * np.pi).T, aspect="auto", cmap="twilight")
    fig.colorbar(im, ax=ax, label="phase (rad, mod 2π)")
    ax.set(xlabel="token id", ylabel="wave index", title="Phases (first 100 tokens)")
    return _save(fig, path)


def plot_harmonics(tab: dict, path: Path) -> Path:
    amps = np.abs(tab["amps"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(np.arange(amps.shape[1]), amps.mean(axis=(0, 2)))
    a.set(xlabel="wave index", ylabel="mean |A|", title="Mean harmonic amplitude per wave")
    n = np.arange(1, amps.shape[2] + 1)
    by_h = amps.mean(axis=(0, 1))
    b.plot(n, by_h, "o-", label="learned mean |A|")
    b.plot(n, by_h[0] / n, "--", label="1/n reference")
    b.set(xlabel="harmonic number n", ylabel="mean |A|", title="|A| by harmonic vs 1/n")
    b.legend()
    return _save(fig, path)


def plot_wave_packets(tab: dict, path: Path) -> Path:
    vocab = tab["freqs"].shape[0]
    tokens = [t for t in PACKET_TOKENS if t < vocab]
    t = np.linspace(0, 2 * np.pi, 400)
    fig, axes = plt.subplots(len(tokens), 1, figsize=(8, 1.6 * len(tokens)), squeeze=False)
    for ax, tok in zip(axes[:, 0], tokens, strict=True):
        ax.plot(t, token_wave(tab, tok, t))
        ax.set(ylabel=f"token {tok}")
    axes[0, 0].set_title("Wave packets: Σ_h A·sin(f·h·t + φ), first 8 waves")
    axes[-1, 0].set_xlabel("t (rad)")
    return _save(fig, path)


def plot_attention(params: dict, config: Any, path: Path) -> Path:
    layers = [params[f"blocks_{i}"]["attn"] for i in range(config.num_layers)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if config.attention == "interference":
        temps = [float(np.asarray(a["temperature"]).reshape(-1)[0]) for a in layers]
        ax.bar(np.arange(len(temps)), temps, label="learned τ")
        ax.axhline(np.sqrt(config.num_waves), color="r", ls="--", label="√W (init)")
        ax.set(ylabel="temperature τ", title="Attention temperature per layer")
    elif not config.linear:
        scales = np.stack([np.asarray(a["interference_scale"]).reshape(-1) for a in layers])
        im = ax.imshow(scales.T, aspect="auto", cmap="coolwarm")
        fig.colorbar(im, ax=ax, label="interference scale")
        ax.set(ylabel="head", title="Pure-wave interference scale per layer and head")
    else:
        ax.text(0.5, 0.5, "linear pure-wave attention has no scale or temperature", ha="center")
        ax.set(ylabel="-", title="Attention parameters")
    ax.set_xlabel("layer")
    if config.attention == "interference":
        ax.legend()
    return _save(fig, path)


def plot_polar(tab: dict, path: Path) -> Path:
    fig = plt.figure(figsize=(10, 4))
    vocab = tab["freqs"].shape[0]
    for i, tok in enumerate([t for t in PACKET_TOKENS if t < vocab][:3]):
        ax = fig.add_subplot(1, 3, i + 1, projection="polar")
        r = np.abs(tab["amps"][tok]).mean(axis=1)
        ax.scatter(tab["phases"][tok], r, c=np.arange(len(r)), cmap="viridis")
        ax.set_title(f"token {tok}: phase vs mean |A|")
        ax.set_xlabel("phase (angle), mean |A| (radius)")
    return _save(fig, path)


def plot_complex_plane(tab: dict, path: Path) -> Path:
    sub = slice(0, 200)
    amp = tab["amps"][sub].mean(axis=2)
    phi = tab["phases"][sub]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.scatter((amp * np.cos(phi)).ravel(), (amp * np.sin(phi)).ravel(), s=3, alpha=0.5)
    a.set(xlabel="A·cos φ", ylabel="A·sin φ", title="Complex plane (first 200 tokens)")
    b.scatter(tab["freqs"][sub].ravel(), np.mod(phi, 2 * np.pi).ravel(), s=3, alpha=0.5)
    b.set(xlabel="base frequency", ylabel="phase (mod 2π)", title="Frequency vs phase")
    return _save(fig, path)


def plot_spectrogram(tab: dict, path: Path) -> Path:
    n_tok = min(200, tab["freqs"].shape[0])
    bins = np.linspace(0, 10, 101)
    spec = np.zeros((n_tok, 100))
    amp = np.abs(tab["amps"]).sum(axis=2)
    for tok in range(n_tok):
        spec[tok], _ = np.histogram(tab["freqs"][tok], bins=bins, weights=amp[tok])
    fig, ax = plt.subplots(figsize=(8, 4))
    im = ax.imshow(spec.T, aspect="auto", origin="lower", extent=(0, n_tok, 0, 10), cmap="magma")
    fig.colorbar(im, ax=ax, label="Σ|A| in bin")
    ax.set(xlabel="token id", ylabel="base frequency", title="Token spectrogram")
    return _save(fig, path)


def plot_interference(tab: dict, path: Path) -> Path:
    vocab = tab["freqs"].shape[0]
    pairs = [(a, b) for a, b in PAIRS if max(a, b) < vocab] or [(0, min(1, vocab - 1))]
    t = np.linspace(0, 2 * np.pi, 400)
    fig, axes = plt.subplots(len(pairs), 1, figsize=(8, 2.2 * len(pairs)), squeeze=False)
    for ax, (a, b) in zip(axes[:, 0], pairs, strict=True):
        wa, wb = token_wave(tab, a, t), token_wave(tab, b, t)
        ax.plot(t, wa, alpha=0.6, label=f"token {a}")
        ax.plot(t, wb, alpha=0.6, label=f"token {b}")
        ax.plot(t, wa + wb, "k", label="sum")
        ax.set(ylabel="amplitude", title=f"Interference of tokens {a} and {b}")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("t (rad)")
    return _save(fig, path)


def _frame(fig: plt.Figure) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("P", palette=Image.ADAPTIVE)


def generation_gif(
    module: Any,
    params: dict,
    prompt: Sequence[int],
    path: Path,
    steps: int = 12,
    temperature: float = 0.8,
    seed: int = 0,
    decode: Any = None,
) -> Path:
    """Sample ``steps`` tokens (full forward per step) and draw one frame per step."""
    tab = wave_tables(params)
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x).logits[0, -1])
    ids = list(prompt)
    key = jax.random.key(seed)
    t = np.linspace(0, 2 * np.pi, 200)
    frames = []
    for i in range(steps):
        logits = np.asarray(apply(params, jnp.asarray([ids], jnp.int32)), np.float64)
        probs = np.exp((logits - logits.max()) / max(temperature, 1e-6))
        probs /= probs.sum()
        top = np.argsort(-probs)[:10]
        key, sub = jax.random.split(key)
        nxt = int(jax.random.categorical(sub, jnp.log(jnp.asarray(probs))))
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        a.bar([str(int(k)) for k in top], probs[top])
        a.set(xlabel="token id", ylabel="probability", title=f"Step {i + 1}: next-token top 10")
        sup = sum(probs[k] * token_wave(tab, int(k), t) for k in top[:5])
        b.plot(t, sup)
        b.set(xlabel="t (rad)", ylabel="amplitude", title="Probability-weighted top-5 waves")
        text = decode(ids) if decode else " ".join(map(str, ids[-12:]))
        fig.suptitle(f"…{text[-60:]}", fontsize=8)
        frames.append(_frame(fig))
        ids.append(nxt)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=400, loop=0)
    return path


def render_all(
    module: Any,
    params: dict,
    config: Any,
    records: Sequence[dict],
    out_dir: Path,
    prompt: Sequence[int] = (0,),
    gif_steps: int = 12,
    decode: Any = None,
) -> list[Path]:
    """Every figure into ``out_dir``; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tab = wave_tables(params)
    return [
        plot_learning_curve(records, out_dir / "learning_curve.png"),
        plot_frequencies(tab, out_dir / "frequencies.png"),
        plot_phases(tab, out_dir / "phases.png"),
        plot_harmonics(tab, out_dir / "harmonics.png"),
        plot_wave_packets(tab, out_dir / "wave_packets.png"),
        plot_attention(params, config, out_dir / "attention.png"),
        plot_polar(tab, out_dir / "polar_phases.png"),
        plot_complex_plane(tab, out_dir / "complex_plane.png"),
        plot_spectrogram(tab, out_dir / "spectrogram.png"),
        plot_interference(tab, out_dir / "interference.png"),
        generation_gif(
            module, params, prompt, out_dir / "generation.gif", gif_steps, decode=decode
        ),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", help="a wavegpt training run (experiments.train)")
    p.add_argument("--which", default="latest", choices=("latest", "best"))
    p.add_argument("--preset", default="test", help="without --run-dir: a fresh wavegpt preset")
    p.add_argument("--out", help="output folder (default RUN/plots)")
    p.add_argument("--prompt", default="To be or not to be")
    p.add_argument("--gif-steps", type=int, default=20)
    args = p.parse_args(argv)
    if args.run_dir:
        from qpf.training.metrics import read_metrics
        from qpf.training.restore import load_run

        run = load_run(args.run_dir, args.which)
        if run.config.family.name != "wavegpt":
            raise SystemExit(f"{args.run_dir} is a {run.config.family.name} run, not wavegpt")
        module, params, config = run.module, run.params["params"], run.config.model_config
        records = read_metrics(Path(args.run_dir))
        prompt = run.tokenizer.encode(args.prompt) or [0]
        decode = run.tokenizer.decode
        out = Path(args.out or Path(args.run_dir) / "plots")
    else:
        from qpf.zoo import get_family

        fam = get_family("wavegpt")
        config = fam.preset(args.preset).model
        module = fam.build(config)
        params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        records, prompt, decode = [], [0], None
        out = Path(args.out or "wave_plots")
    paths = render_all(module, params, config, records, out, prompt, args.gif_steps, decode)
    print(json.dumps([str(x) for x in paths], indent=1))


if __name__ == "__main__":
    main()
