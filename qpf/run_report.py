"""A self-contained HTML report of one or more training runs (figures embedded as PNG).

Sections: config, learning curves (loss, PPL, bits/byte against tokens and wall time, runs
overlaid), the philosophy metrics over time, per-module gradient norms and update ratios,
the recurrence spectrum on the unit circle, coupler routing and memory slot usage on a
probe text, phase polar plots of a few token embeddings, throughput, and the samples
printed at each evaluation. Everything is read from the run directories (``config.json``,
``metrics.jsonl``, ``samples.jsonl``, the newest checkpoint); nothing needs a server.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qpf.diagnostics import model_stats
from qpf.training.metrics import read_metrics

PROBE_TEXT = (
    "Once upon a time there was a little girl who loved to read. Every morning she "
    "walked to the library, chose a new book and read it under the old oak tree."
)
METRIC_GROUPS = ("manas", "buddhi", "viveka", "smriti")
POLAR_TOKENS = 4


@dataclasses.dataclass
class RunData:
    """What the report needs of one run directory."""

    name: str
    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    loaded: Any | None  # qpf.training.restore.LoadedRun, or None without a checkpoint
    load_error: str | None = None

    @property
    def tokens_per_step(self) -> int:
        data = self.config.get("data", {})
        return int(data.get("batch_size", 0)) * int(data.get("seq_len", 0))


def read_run(run_dir: str | Path, *, load_model: bool = True) -> RunData:
    """Read a run directory: config, metric and sample records, and the newest checkpoint."""
    path = Path(run_dir)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {path} a training run directory?")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    loaded, error = None, None
    if load_model:
        from qpf.training.restore import load_run

        try:
            loaded = load_run(path, which="latest")
        except Exception as err:  # a run without a readable checkpoint still gets curves
            error = f"{type(err).__name__}: {err}"
    return RunData(
        name=path.name,
        run_dir=path,
        config=config,
        records=read_metrics(path),
        samples=read_metrics(path, "samples"),
        loaded=loaded,
        load_error=error,
    )


# ---------------------------------------------------------------------- figure helpers


def _figure(width: float = 6.4, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def figure_png(fig) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _series(run: RunData, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, wall seconds since the first record, values) of one metric key."""
    rows = [r for r in run.records if isinstance(r.get(key), int | float)]
    steps = np.array([r["step"] for r in rows], float)
    t0 = min((r["time"] for r in run.records if "time" in r), default=0.0)
    times = np.array([r.get("time", t0) - t0 for r in rows], float)
    return steps, times, np.array([r[key] for r in rows], float)


def curve_figure(runs: Sequence[RunData], keys: Sequence[str], x: str, title: str) -> bytes:
    """Metric ``keys`` of every run against x = 'tokens' | 'time' | 'step'."""
    fig, ax = _figure()
    for run in runs:
        for key in keys:
            steps, times, values = _series(run, key)
            if not len(values):
                continue
            xs = {"tokens": steps * run.tokens_per_step, "time": times, "step": steps}[x]
            ax.plot(xs, values, marker="." if len(xs) < 30 else None, label=f"{run.name} {key}")
    ax.set_xlabel({"tokens": "training tokens", "time": "wall time (s)", "step": "step"}[x])
    ax.set_ylabel(", ".join(k.split("/")[-1] for k in keys))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    return figure_png(fig)


def spectrum_figure(run: RunData) -> bytes | None:
    """Recurrence eigenvalues on the unit circle, one colour per layer."""
    if run.loaded is None:
        return None
    family = run.config["model"].rpartition(":")[0] or "qpf"
    spec = model_stats.recurrence_spectrum(family, run.loaded.params["params"])
    if spec is None:
        return None
    fig, ax = _figure(4.8, 4.8)
    theta = np.linspace(0, 2 * np.pi, 256)
    ax.plot(np.cos(theta), np.sin(theta), color="0.6", lw=0.8)
    for i, (mag, ang) in enumerate(zip(spec["abs"], spec["angle"])):
        ax.scatter(mag * np.cos(ang), mag * np.sin(ang), s=6, label=f"layer {i}")
    ax.set_aspect("equal")
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    median = float(np.median(spec["memory_length"]))
    ax.set_title(f"{run.name}: eigenvalues at zero input\nmedian memory {median:.2f} steps")
    ax.legend(fontsize=7, markerscale=2)
    return figure_png(fig)


def _probe(run: RunData) -> Any | None:
    """Forward of the probe text with intermediates (memory reads, routing) or None."""
    if run.loaded is None:
        return None
    import jax.numpy as jnp

    ids = np.array(run.loaded.tokenizer.encode(PROBE_TEXT)[:128], np.int32)[None]
    family = run.config["model"].rpartition(":")[0] or "qpf"
    kwargs = {"return_intermediates": True} if family == "qpf" else {}
    out, sown = run.loaded.module.apply(
        run.loaded.params, jnp.asarray(ids), mutable=["intermediates"], **kwargs
    )
    return out, sown.get("intermediates", {})


def memory_figure(run: RunData, probe: Any | None) -> bytes | None:
    """Histogram of memory slot reads over the probe text."""
    if probe is None:
        return None
    out, _ = probe
    inter = getattr(out, "intermediates", None) or {}
    if "memory_topk_indices" not in inter:
        return None
    num_slots = run.loaded.module.config.memory.num_slots
    counts = np.asarray(model_stats.slot_usage(inter["memory_topk_indices"], num_slots))
    fig, ax = _figure()
    ax.bar(np.arange(num_slots), counts, width=1.0)
    used = int((counts > 0).sum())
    ax.set_xlabel("memory slot")
    ax.set_ylabel("reads")
    ax.set_title(f"{run.name}: slot reads on the probe text ({used}/{num_slots} slots used)")
    return figure_png(fig)


def routing_figure(run: RunData, probe: Any | None) -> bytes | None:
    """Mean coupler routing weight per bank and its entropy over the probe text."""
    if probe is None:
        return None
    _, sown = probe
    routing = model_stats.find_sown(sown, "routing")
    if routing is None:
        return None
    stats = model_stats.routing_stats(routing)
    names = [b["type"] for b in run.config["model_config"].get("banks", [])]
    usage = np.asarray(stats["usage"])
    fig, ax = _figure(5.0, 3.2)
    ax.bar(names[: len(usage)] or [str(i) for i in range(len(usage))], usage)
    ax.set_ylabel("mean routing weight")
    ax.set_xlabel("bank")
    ax.set_title(f"{run.name}: routing (entropy {float(stats['entropy']):.3f} of max)")
    return figure_png(fig)


def polar_figure(run: RunData) -> bytes | None:
    """Phases of the channels of a few probe-token embeddings, one polar panel each."""
    if run.loaded is None:
        return None
    ids = np.array(run.loaded.tokenizer.encode(PROBE_TEXT)[:POLAR_TOKENS])
    phases = model_stats.embedding_phases(run.loaded.params["params"], ids)
    if phases is None:
        return None
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2.6 * len(ids), 2.9), dpi=100)
    for i, (tok, ph) in enumerate(zip(ids, phases)):
        ax = fig.add_subplot(1, len(ids), i + 1, projection="polar")
        ax.scatter(ph, np.ones_like(ph), s=8)
        ax.set_yticklabels([])
        label = run.loaded.tokenizer.decode([int(tok)])
        ax.set_title(f"token {int(tok)} {label!r}", fontsize=8)
    fig.suptitle(f"{run.name}: embedding phases per channel")
    return figure_png(fig)


# ---------------------------------------------------------------------------- the page


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _config_html(run: RunData) -> str:
    text = html.escape(json.dumps(run.config, indent=2))
    warn = run.load_error and f"<p class=warn>model not loaded: {html.escape(run.load_error)}</p>"
    return f"<h3>{html.escape(run.name)}</h3><pre>{text}</pre>{warn or ''}"


def _metric_keys(runs: Sequence[RunData], prefix: str) -> list[str]:
    keys = {k for run in runs for r in run.records for k in r if k.startswith(prefix)}
    return sorted(keys)


def build_report(runs: Sequence[RunData]) -> str:
    """The report page for ``runs`` as one HTML string (images inlined)."""
    sections: list[tuple[str, str, list[str]]] = []  # (id, title, html parts)

    def add(sid: str, title: str, parts: list[str]) -> None:
        sections.append((sid, title, [p for p in parts if p]))

    config_html = "".join(_config_html(r) for r in runs)
    add("config", "Config", [config_html])

    curves = []
    for keys, title in (
        (["train/loss", "val/loss"], "loss (nats/token)"),
        (["val/ppl"], "validation perplexity"),
        (["val/bpb"], "validation bits per byte"),
    ):
        for x in ("tokens", "time"):
            if any(len(_series(r, k)[2]) for r in runs for k in keys):
                curves.append(_img(curve_figure(runs, keys, x, f"{title} vs {x}"), title))
    add("curves", "Learning curves", curves)

    metrics = []
    for group in METRIC_GROUPS:
        keys = _metric_keys(runs, f"train/{group}/")
        if keys:
            metrics.append(_img(curve_figure(runs, keys, "step", group.capitalize()), group))
    if not metrics:
        metrics.append("<p>No philosophy metrics were logged (train.metrics=off).</p>")
    add("metrics", "Manas, Buddhi, Viveka, Smriti", metrics)

    dyn = []
    for prefix, title in (
        ("train/grad_norm/", "gradient norm per module"),
        ("train/update_ratio/", "update / parameter norm per module"),
    ):
        keys = _metric_keys(runs, prefix)
        if keys:
            dyn.append(_img(curve_figure(runs, keys, "step", title), title))
    add("dynamics", "Optimisation dynamics", dyn or ["<p>No per-module norms were logged.</p>"])

    model_parts = []
    for run in runs:
        probe = _probe(run)
        for fig in (
            spectrum_figure(run),
            routing_figure(run, probe),
            memory_figure(run, probe),
            polar_figure(run),
        ):
            if fig is not None:
                model_parts.append(_img(fig, run.name))
    add("model", "Inside the model", model_parts or ["<p>No model figures apply.</p>"])

    add(
        "throughput",
        "Throughput",
        [_img(curve_figure(runs, ["train/tokens_per_s"], "step", "train tokens/s"), "throughput")],
    )

    samples = []
    for run in runs:
        for s in run.samples:
            samples.append(
                f"<h4>{html.escape(run.name)} step {s['step']}</h4>"
                f"<pre>{html.escape(str(s.get('sample', '')))}</pre>"
            )
    add("samples", "Samples", samples or ["<p>No samples were recorded.</p>"])
    return _page(runs, sections)


def _page(runs: Sequence[RunData], sections: list[tuple[str, str, list[str]]]) -> str:
    title = "qpf run report: " + ", ".join(r.name for r in runs)
    nav = " · ".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{html.escape(t)}</h2>\n' + "\n".join(parts) + "</section>"
        for sid, t, parts in sections
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "img{max-width:100%;margin:4px}pre{background:#f4f4f4;padding:6px;overflow-x:auto;"
        "white-space:pre-wrap}.warn{color:#a00}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><nav>{nav}</nav>"
        f"{body}</body></html>"
    )


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Build the report of ``run_dirs``; write it to ``out`` (default RUN/report.html)."""
    runs = [read_run(d) for d in run_dirs]
    path = Path(out) if out else Path(run_dirs[0]) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(runs), encoding="utf-8")
    return path
