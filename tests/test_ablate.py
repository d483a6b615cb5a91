"""``experiments.ablate``: override paths, parameter matching, a tiny grid end to end, resuming."""

from __future__ import annotations

import json
import math

import pytest

from experiments import ablate
from experiments.ablate import Grid, Variant, WidthRule
from qpf import config as cfgs
from qpf.config import ConfigError
from qpf.data.tokenizers import get_tokenizer
from qpf.zoo import resolve_model


@pytest.fixture(scope="module")
def byte_tok():
    return get_tokenizer("byte")


def qpf_test_config():
    return resolve_model("qpf:test")[1].model


# ------------------------------------------------------------------------ overrides


def test_overrides_set_nested_fields_tuple_items_and_none():
    base = qpf_test_config()
    out = ablate.apply_overrides(
        base,
        {"backbone.damping_init": 0.5, "banks.0.dropout": 0.0, "memory": None, "dim": 8},
    )
    assert out.backbone.damping_init == 0.5
    assert out.banks[0].dropout == 0.0
    assert out.banks[1] == base.banks[1]
    assert out.memory is None
    assert out.dim == 8
    assert out.backbone.state_dim == base.backbone.state_dim  # untouched fields stay
    assert ablate.apply_overrides(base, {}) == base
    assert ablate.get_path(out, "banks.0.dropout") == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone.dampng_init": 0.5}, "BackboneConfig has no field 'dampng_init'"),
        ({"nope": 1}, "ModelConfig has no field 'nope'"),
        ({"memory.num_slots": 3}, "'memory.num_slots': memory is disabled"),
        ({"banks.7.dropout": 0.0}, "banks is a tuple of 2 items"),
        ({"backbone.damping_init": "big"}, "'big' does not fit BackboneConfig.damping_init"),
        ({"dim": True}, "does not fit ModelConfig.dim"),
        ({"backbone.dropout": 2.0}, "'backbone.dropout': BackboneConfig.dropout = 2.0"),
        ({"backbone..dropout": 0.0}, "expected a dotted field path"),
    ],
)
def test_override_errors_name_the_path(overrides, message):
    base = qpf_test_config()
    if "memory.num_slots" in overrides:
        base = ablate.apply_overrides(base, {"memory": None})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ablate.apply_overrides(base, overrides)


def test_bad_grid_fails_before_training(byte_tok):
    def grid(*variants):
        return Grid("g", "test", variants, baselines=())

    root = Variant("a", None, "qpf:test")
    cases = [
        (grid(root, Variant("b", "zz")), "parent 'zz' is not a variant listed before it"),
        (grid(root, Variant("a", "a")), "the name is used twice"),
        (grid(root, Variant("b c", "a")), "names use letters"),
        (grid(Variant("a")), "first variant needs a model"),
        (
            grid(root, Variant("b", "a", overrides={"backbone.x": 1})),
            "grid g, variant 'b' (qpf:test): override 'backbone.x'",
        ),
        (grid(root, Variant("b", "a", "transformer:nope")), "unknown transformer preset"),
    ]
    for g, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ablate.resolve_grid(g, byte_tok, count=lambda family, config: 100)


def test_children_inherit_their_parents_overrides(byte_tok):
    g = Grid(
        "g",
        "test",
        (
            Variant("a", None, "qpf:test"),
            Variant("b", "a", overrides={"backbone.damping_init": 3.0}),
            Variant("c", "b", overrides={"episodic": None}),
        ),
        baselines=(),
    )
    resolved = ablate.resolve_grid(g, byte_tok, count=lambda family, config: 1000)
    c = resolved[2].config
    assert c.backbone.damping_init == 3.0
    assert c.episodic is None
    assert resolved[1].config.episodic is not None
    assert all(r.spec == "qpf:test" for r in resolved)


# ------------------------------------------------------------------ parameter matching


def test_parameter_matching_within_tolerance_on_real_counts(byte_tok):
    # No banks: the child must widen to carry the reference's parameters. The reference is
    # wide enough that one step of dim moves the count by less than 10%.
    root = Variant("ref", None, "qpf:test", {"dim": 30})
    child = Variant("bankless", "ref", overrides={"banks": ()})
    ref, child = ablate.resolve_grid(Grid("g", "test", (root, child), baselines=()), byte_tok)
    assert child.width[0] == "dim"
    assert child.width[2] > child.width[1] == 30
    assert abs(child.params - ref.params) <= 0.05 * ref.params
    # The reported count is the model's; the state width kept its ratio (7/30) to dim.
    assert ablate.count_params(child.family, child.config) == child.params
    assert child.config.backbone.state_dim == round(7 / 30 * child.config.dim)


def quadratic_count(family, config):
    """A fake count that grows with dim and the layer count (fast, exact expectations)."""
    return 1000 * config.backbone.num_layers + 7 * config.dim**2


def test_matching_search_picks_the_closest_width(byte_tok):
    g = Grid(
        "g",
        "test",
        (Variant("ref", None, "qpf:test"), Variant("big", "ref", overrides={"dim": 60})),
        baselines=(),
        tolerance=0.01,
    )
    ref, big = ablate.resolve_grid(g, byte_tok, count=quadratic_count)
    assert ref.params == 2000 + 7 * 36
    best = min(range(1, 40), key=lambda d: abs(2000 + 7 * d * d - ref.params))
    assert big.config.dim == best == 6


def test_matching_fails_clearly(byte_tok):
    root = Variant("ref", None, "qpf:test")

    def grid(child, tolerance=0.05):
        return Grid("g", "test", (root, child), baselines=(), tolerance=tolerance)

    # The reference has 2000 + 7·36 = 2252. Three layers cost 3000 even at dim 1.
    with pytest.raises(ConfigError, match=r"closest: dim=1 gives 3,007, \+33\.5%"):
        ablate.resolve_grid(
            grid(Variant("b", "ref", overrides={"backbone.num_layers": 3})),
            byte_tok,
            count=quadratic_count,
        )
    # One layer: dim 13 gives 2183 (-3.1%), dim 14 gives 2372 (+5.3%): not within 1%.
    with pytest.raises(ConfigError, match=r"within 1% by changing dim \(closest: dim=13"):
        ablate.resolve_grid(
            grid(Variant("b", "ref", overrides={"backbone.num_layers": 1}), 0.01),
            byte_tok,
            count=quadratic_count,
        )
    # A width field that does not change the count.
    flat = Variant("b", "ref", None, {"dim": 30}, WidthRule("episodic.window"))
    with pytest.raises(ConfigError, match="leaves the parameter count"):
        ablate.resolve_grid(grid(flat), byte_tok, count=quadratic_count)
    bad_rule = Variant("b", "ref", None, {"dim": 30}, WidthRule("width"))
    with pytest.raises(ConfigError, match="the width rule names 'width'"):
        ablate.resolve_grid(grid(bad_rule), byte_tok, count=quadratic_count)


# ------------------------------------------------------------------------ end to end

TINY = Grid(
    "tiny",
    "two transformer variants for the tests",
    (
        Variant("base", None, "transformer:test"),
        Variant("no-dropout", "base", overrides={"dropout": 0.0}),
    ),
    baselines=(),
)


def tiny_args(out, data_dir, *extra):
    flags = f"--grid tiny --out {out} --data-dir {data_dir} --tokens 320 --seq-len 16 --batch 4"
    return ablate.parse_args(
        [*flags.split(), "--eval-batches", "2", "--eval-every-tokens", "128", *extra]
    )


@pytest.mark.slow
def test_tiny_grid_end_to_end_and_resume(tmp_path, data_dir):
    out = tmp_path / "abl"
    grids = {"tiny": TINY}
    first = ablate.run(tiny_args(out, data_dir), grids)
    assert first["trained"] == ["base", "no-dropout"]
    assert first["skipped"] == []
    rows = {r["variant"]: r for r in first["variants"]}
    for row in rows.values():
        assert row["steps"] == 5
        assert row["tokens"] == 320
        assert [p["tokens"] for p in row["val_curve"]] == [0, 128, 256, 320]
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["train_tokens_per_s"] > 0
        assert row["wall_s"] > 0
    assert rows["no-dropout"]["parent"] == "base"
    saved = json.loads((out / "results.json").read_text())
    assert [v["variant"] for v in saved["variants"]] == ["base", "no-dropout"]
    md = (out / "results.md").read_text()
    delta = rows["no-dropout"]["val_loss"] - rows["base"]["val_loss"]
    assert "| no-dropout | base | transformer:test | dim=12 |" in md
    assert f"{delta:+.4f}" in md
    assert "bits/byte" in md
    assert (out / "curves.png").stat().st_size > 1000

    # Second run: both finished, nothing trains, no run file is touched.
    watched = [out / "results" / f"{n}.json" for n in rows]
    watched += [out / "runs" / n / "metrics.jsonl" for n in rows]
    before = {p: p.stat().st_mtime_ns for p in watched}
    second = ablate.run(tiny_args(out, data_dir), grids)
    assert second["trained"] == []
    assert second["skipped"] == ["base", "no-dropout"]
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert second["variants"] == json.loads(json.dumps(first["variants"]))

    # A variant without its result resumes from its checkpoint (the final one here:
    # no step is trained again) and reports the same validation loss.
    (out / "results" / "no-dropout.json").unlink()
    third = ablate.run(tiny_args(out, data_dir), grids)
    assert third["trained"] == ["no-dropout"]
    again = {r["variant"]: r for r in third["variants"]}["no-dropout"]
    assert again["resumed_from_step"] == 5
    assert again["val_loss"] == pytest.approx(rows["no-dropout"]["val_loss"], rel=1e-6)

    # A result written before a config field existed counts as having its default value.
    path = out / "results" / "base.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    del record["run_config"]["model_config"]["matmul_precision"]
    path.write_text(json.dumps(record), encoding="utf-8")
    assert ablate.run(tiny_args(out, data_dir), grids)["trained"] == []

    # Another setup in the same --out is refused, not mixed.
    with pytest.raises(ConfigError, match="trained with another setup"):
        ablate.run(tiny_args(out, data_dir, "--seed", "1"), grids)


def test_cli_lists_grids_and_rejects_unknown_names(capsys):
    assert ablate.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "v4-to-v5" in listed
    assert "no-memory" in listed
    assert "transformer:tiny-byte" in listed
    assert ablate.main(["--grid", "nope"]) == 2
    assert "--grid 'nope' is unknown" in capsys.readouterr().err
    assert ablate.main(["--plan", "--only", "zz", "--grid", "v4-to-v5"]) == 2
    assert "--only zz: not in grid v4-to-v5" in capsys.readouterr().err


def test_v4_to_v5_grid_overrides_are_valid():
    # Paths only (no parameter counting): every variant's config builds.
    g = ablate.GRIDS["v4-to-v5"]
    resolved = ablate.resolve_grid(g, get_tokenizer("byte"), count=lambda f, c: 1000)
    by = {r.variant.name: r.config for r in resolved}
    assert by["v4"] == resolve_model("qpf:tiny-byte")[1].model  # faithful v4 untouched
    assert by["no-banks"].banks == ()
    assert by["no-banks"].memory is None
    assert isinstance(by["damping-4"].backbone, cfgs.BackboneConfig)
