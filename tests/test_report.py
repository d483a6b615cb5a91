"""The run report and the in-step metrics, from a tiny real training run.

One 4-step run (module fixture) with the metrics on, evaluations (and samples) at steps 2
and 4 and diagnostics every 2 steps; the report is built from it and checked section by
section, each figure decoded as an image, and once in a real headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import report as report_cli
from experiments import train as train_cli
from qpf.run_report import build_report, read_run
from qpf.training.metrics import read_metrics

pytestmark = pytest.mark.slow

GROUPS = {
    "manas": ("magnitude", "activity", "entropy"),
    "buddhi": ("confidence", "margin", "entropy"),
    "viveka": ("coherence", "energy", "stability"),
    "smriti": ("sharpness", "hit_rate", "coverage"),
}
SECTIONS = ("config", "curves", "metrics", "dynamics", "model", "throughput", "samples")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("report") / "tiny"
    args = [
        "--dataset", "tinyshakespeare", "--tokenizer", "byte", "--data-dir", str(data_dir),
        "--run-dir", str(run), "--steps", "4", "--batch-size", "4", "--seq-len", "16",
        "--eval-every", "2", "--save-every", "2", "--eval-batches", "1", "--log-every", "1",
        "--no-progress",
        "--set", "model.dim=8", "--set", "model.backbone.state_dim=16",
        "--set", "model.backbone.num_layers=2", "--set", "model.memory.num_slots=127",
        "--set", "model.episodic.window=4", "--set", "train.sample_tokens=4",
        "--set", "train.diagnostics_every=2",
    ]  # fmt: skip
    assert train_cli.main(args) == 0
    return run


@pytest.fixture(scope="module")
def page(run_dir) -> str:
    assert report_cli.main(["--run-dir", str(run_dir)]) == 0
    return (run_dir / "report.html").read_text(encoding="utf-8")


def test_every_metric_is_logged_and_moves(run_dir):
    records = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for group, names in GROUPS.items():
        for name in names:
            values = [r[f"train/{group}/{name}"] for r in records]
            assert all(np.isfinite(values)), (group, name, values)
            assert len(set(values)) >= 2, f"{group}/{name} is constant: {values}"
    assert any(k.startswith("train/grad_norm/backbone") for k in records[0])
    assert any(k.startswith("train/update_ratio/embed") for k in records[0])
    diag = [r for r in read_metrics(run_dir) if "diag/spectrum/max_abs" in r]
    assert [r["step"] for r in diag] == [2, 4]
    assert 0.0 < diag[0]["diag/spectrum/max_abs"] < 1.0


def test_report_has_every_section_and_valid_images(page):
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in page, sid
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 12
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.verify()
        img = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
        assert min(img.width, img.height) > 100
        assert np.asarray(img).std() > 1.0  # not a blank canvas
    for group in GROUPS:
        assert f'alt="{group}"' in page
    assert [page.count(f"step {s}</h4>") for s in (2, 4)] == [1, 1]  # the samples


def test_report_overlays_runs_and_writes_out(run_dir, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin, ignore=shutil.ignore_patterns("report.html"))
    out = tmp_path / "both.html"
    assert (
        report_cli.main(["--run-dir", str(run_dir), "--run-dir", str(twin), "--out", str(out)]) == 0
    )
    page = out.read_text(encoding="utf-8")
    assert "tiny, twin" in page
    assert not (twin / "report.html").exists()


def test_report_errors_name_the_folder(tmp_path, capsys):
    assert report_cli.main(["--run-dir", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_report_without_checkpoint_still_has_curves(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(run_dir / name, bare / name)
    run = read_run(bare)
    assert run.loaded is None
    assert "checkpoint" in run.load_error.lower()
    page = build_report([run])
    assert "model not loaded" in page
    assert '<section id="curves">' in page
    json.loads((bare / "config.json").read_text())


def _browser():
    """A headless Chromium through Selenium, or skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Chromium and chromedriver are not installed (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_bin)
    return webdriver.Chrome(options=opts, service=service)


def test_report_renders_in_headless_chromium(run_dir, page):
    driver = _browser()
    try:
        driver.get((run_dir / "report.html").resolve().as_uri())
        state = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);"
        )
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        title = driver.title
    finally:
        driver.quit()
    assert title.startswith("qpf run report")
    assert len(state) == page.count("<img")
    assert all(done and width > 0 for done, width in state), state
    assert errors == []
