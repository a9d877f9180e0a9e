"""The README's CPU-study numbers are the committed study's: each paired difference it quotes is recomputed here
from the per-run records in docs/ with scipy (independently of scripts/compare_stats.py), and each mechanism
figure is looked up in the generated report's window table."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


def _text(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8").replace("−", "-").split())


README = _text(ROOT / "README.md")
README_LINES = (ROOT / "README.md").read_text(encoding="utf-8").replace("−", "-").splitlines()

# (study, arm a, arm b): the README quotes the mean ([low, high]) of a − b in test-error points.
TEST_ERROR_CLAIMS = [
    ("study-cpu", "gr-no-lr-warmup", "plain-no-lr-warmup"),
    ("study-cpu", "gr", "plain"),
    ("study-cpu", "lambda-warmup", "gr"),
    ("study-cpu", "r-warmup", "gr"),
    ("study-cpu", "zero-warmup", "gr"),
    ("study-cpu", "zero-warmup", "plain"),
    ("study-cpu", "zero-warmup-p0.5", "zero-warmup"),
    ("study-ascent", "zero-warmup-ascent25", "zero-warmup"),
    ("study-one-pass", "zero-warmup-previous", "zero-warmup"),
    ("study-one-pass", "zero-warmup-previous", "plain"),
    ("study-one-pass", "zero-warmup", "plain"),
]


def _metric(study: str, arm: str, metric: str) -> dict[int, float]:
    runs = json.loads((ROOT / "docs" / f"{study}.json").read_text())["runs"]
    return {r["seed"]: r["metrics"][metric] for r in runs if r["arm"] == arm}


def _paired(
    study: str, a: str, b: str, metric: str = "test_error_rate", scale: float = 100
) -> tuple[float, float, float, float]:
    """Mean, 95 % t-interval and paired t-test p of `scale` × (a − b), paired by seed (100: rates in points)."""
    xa, xb = _metric(study, a, metric), _metric(study, b, metric)
    diffs = [scale * (xa[s] - xb[s]) for s in sorted(xa.keys() & xb.keys())]
    assert len(diffs) >= 5
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    half = stats.t.ppf(0.975, len(diffs) - 1) * se
    return mean, mean - half, mean + half, float(stats.ttest_1samp(diffs, 0.0).pvalue)


@pytest.mark.parametrize("study, a, b", TEST_ERROR_CLAIMS, ids=[f"{s}:{a}-{b}" for s, a, b in TEST_ERROR_CLAIMS])
def test_each_quoted_test_error_difference_is_the_records(study, a, b):
    mean, low, high, p = _paired(study, a, b)
    quoted = f"{mean:+.2f} ([{low:+.2f}, {high:+.2f}]".lstrip("+")
    assert quoted in README, quoted
    # Worded by its statistics: a p is quoted (with a claim) only when p < 0.05.
    if p < 0.05:
        assert f"{quoted}, p = {p:.2g}" in README
    else:
        assert f"{quoted}, p =" not in README


# Other differences the README quotes: (study, a, b, metric, scale, the quoted form, the p it must be below).
OTHER_CLAIMS = [
    ("study-cpu", "gr", "plain", "test_loss", 1, "test loss ({mean:+.2f} against plain, p < 0.001)", 0.001),
    ("study-cpu", "gr", "plain", "train_clean_error_rate", 100, "more training images ({mean:+.0f} points)", 0.001),
    ("study-ascent", "zero-warmup-ascent25", "zero-warmup", "test_loss", 1, "loss ({mean:+.2f}, p = {p:.1g})", 0.05),
]


@pytest.mark.parametrize(
    "study, a, b, metric, scale, form, below", OTHER_CLAIMS, ids=["gr-loss", "gr-train", "ascent"]
)
def test_each_quoted_loss_and_training_error_difference_is_the_records(study, a, b, metric, scale, form, below):
    mean, _, _, p = _paired(study, a, b, metric, scale)
    assert p < below
    assert form.format(mean=mean, p=p) in README


def test_the_cheaper_modes_page_quotes_the_ascent_study():
    mean, low, high, p = _paired("study-ascent", "zero-warmup-ascent25", "zero-warmup")
    page = _text(ROOT / "docs" / "cheaper-gr.md")
    assert f"{mean:+.2f} points, 95 % CI [{low:+.2f}, {high:+.2f}], p = {p:.2f}" in page
    errors = [statistics.mean(_metric("study-ascent", arm, "test_error_rate").values()) for arm in
              ("zero-warmup-ascent25", "zero-warmup")]  # fmt: skip
    assert f"test error {100 * errors[0]:.2f} ± " in page and f"against {100 * errors[1]:.2f} ± " in page


@pytest.mark.parametrize("page_name", ["cheaper-gr.md", "benchmark.md"])
def test_the_one_pass_study_is_quoted_as_recorded(page_name):
    page, study = _text(ROOT / "docs" / page_name), "study-one-pass"
    for b, claim in (("zero-warmup", "higher"), ("plain", None)):
        mean, low, high, p = _paired(study, "zero-warmup-previous", b)
        assert f"{mean:+.2f} points, 95 % CI [{low:+.2f}, {high:+.2f}], p = " in page
        assert (p < 0.05) == (claim is not None)  # worded by its p: "higher" only below 0.05
        quoted = f"p = {p:.2g}, unadjusted" if claim else f"p = {p:.2f})"
        assert quoted in page
    runs = json.loads((ROOT / "docs" / f"{study}.json").read_text())["runs"]
    wall = {(r["arm"], r["seed"]): r["wall_s"] for r in runs}
    ratio = statistics.median(wall["zero-warmup-previous", seed] / wall["plain", seed] for seed in range(5))
    assert f"{ratio:.2f}× " in page


def test_the_cheaper_modes_page_quotes_the_one_pass_study():
    page, study = _text(ROOT / "docs" / "cheaper-gr.md"), "study-one-pass"
    for arm in ("zero-warmup-previous", "zero-warmup", "plain"):
        errors = [100 * e for e in _metric(study, arm, "test_error_rate").values()]
        assert f"{statistics.mean(errors):.2f} ± {statistics.stdev(errors):.2f} %" in page
        assert f"{statistics.mean(_metric(study, arm, 'test_loss').values()):.2f}" in page
    for b in ("zero-warmup", "plain"):
        assert _paired(study, "zero-warmup-previous", b, "test_loss", 1)[3] < 0.001
    runs = json.loads((ROOT / "docs" / f"{study}.json").read_text())["runs"]
    passes = {r["arm"]: r["forward_backward_passes"] for r in runs}
    assert f"({passes['zero-warmup-previous']:,} against full GR's {passes['zero-warmup']:,} per run)" in page
    assert "in an exploratory A/B on CPU (batch 32) ended at a higher test error than full GR" in README
    mean, low, high, p = _paired(study, "zero-warmup-previous", "zero-warmup", "test_exact1000_error_rate")
    assert p >= 0.05 and f"({mean:+.2f} points, 95 % CI [{low:+.2f}, {high:+.2f}], p = {p:.2g})" in page
    mean, low, high, p = _paired(study, "zero-warmup", "plain")
    assert p < 0.05
    assert f"lower ({mean:+.2f} points, 95 % CI [{low:+.2f}, {high:+.2f}], p = {p:.2g}, unadjusted)" in page
    here = _metric(study, "zero-warmup", "test_error_rate")
    there = _metric("study-ascent", "zero-warmup", "test_error_rate")
    gaps = [100 * (there[seed] - here[seed]) for seed in here]
    assert min(gaps) > 0 and f"lower here by {min(gaps):.2f}–{max(gaps):.2f} points seed by seed" in page
    wall = {(r["arm"], r["seed"]): r["wall_s"] for r in runs}
    for arm, form in (("zero-warmup-previous", "and {:.2f}× plain's wall time"), ("zero-warmup", "full GR {:.2f}×")):
        ratio = statistics.median(wall[arm, seed] / wall["plain", seed] for seed in range(5))
        assert form.format(ratio) in page


def test_the_regime_numbers_are_the_records():
    plain_train = statistics.mean(_metric("study-cpu", "plain", "train_clean_error_rate").values())
    plain_test = statistics.mean(_metric("study-cpu", "plain", "test_error_rate").values())
    assert (
        f"{100 * plain_train:.1f} % error on its own training images, {100 * plain_test:.1f} % on held-out" in README
    )


def _window_cells() -> dict[tuple[str, str], list[float]]:
    """GR − plain (with LR warmup) in the report's window table: (statistic, window) → the relative difference's
    mean, low and high, in percent."""
    report = (ROOT / "docs" / "study-cpu.md").read_text(encoding="utf-8").replace("−", "-").replace("–", "-")
    cells = {}
    for line in report.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(row) == 9 and row[0] == "GR - plain":
            cells[(row[1], row[2].split(" (")[0])] = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", row[7])]
    return cells


def test_the_quoted_mechanism_figures_are_the_reports():
    cells = _window_cells()
    for window in ("rest of warmup", "W-2W"):  # "lowered ‖g1‖ by 28 % over ... and 39 % over ..."
        mean, _, high = cells[("gr_grad_norm", window)]
        assert high < 0 and f"{-round(mean)} % over" in README
    for key in [("adaptive_psi_mean", "rest of warmup"), ("adaptive_psi_mean", "W-2W"), ("adaptive_psi_var", "W-2W")]:
        mean, low, high = (round(x) for x in cells[key])
        assert low > 0 and f"{mean} % ([{low}, {high}] %)" in README, key


def test_the_quoted_interval_widths_are_the_records():
    """ "A 95 % interval here reaches 0.5–1.1 points either side of its mean": the half-widths of the study's
    test-error intervals."""
    halves = [(high - low) / 2 for low, high in (_paired(*claim)[1:3] for claim in TEST_ERROR_CLAIMS[:7])]
    assert f"reaches {min(halves):.1f}–{max(halves):.1f} points either side" in README


# The table of every earlier study version: (study records, its row's first cell) → GR − plain and zero − GR.
VERSIONS = [("study-cpu-short", "[short]"), ("study-cpu-1280", "1,280 steps"), ("study-cpu", "[2,400 steps]")]


@pytest.mark.parametrize("study, row", VERSIONS, ids=[s for s, _ in VERSIONS])
def test_the_table_of_study_versions_is_the_records(study, row):
    line = next(x for x in README_LINES if x.startswith(f"| {row}"))
    for a, b in (("gr", "plain"), ("zero-warmup", "gr")):
        mean, low, high, _ = _paired(study, a, b)
        assert f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]" in line, (a, b)
    seeds = len(_metric(study, "plain", "test_error_rate"))
    assert f"| {seeds} |" in line


def test_the_adjusted_p_and_the_regime_of_the_1280_step_version_are_the_records():
    pairs = TEST_ERROR_CLAIMS[:7] + [("study-cpu", "plain", "plain-no-lr-warmup")]  # the study's 8 contrasts
    ps = [_paired(*pair)[3] for pair in pairs]
    order = sorted(range(8), key=lambda i: ps[i])
    holm, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (8 - rank) * ps[i]))
        holm[i] = running
    assert f"Holm over the study's 8 test-error contrasts: p = {holm[0]:.2f})" in README
    train_error = statistics.mean(_metric("study-cpu-1280", "plain", "train_clean_error_rate").values())
    assert f"plain still erred on {100 * train_error:.0f} % of its training images" in README


def test_the_scale_free_dispersion_did_not_rise():
    report = (ROOT / "docs" / "study-cpu.md").read_text(encoding="utf-8").replace("−", "-").replace("–", "-")
    rows = [r for r in report.splitlines() if r.startswith("| GR - plain | adaptive_lr_log_var |")]
    lows = {r.split("|")[3].strip().split(" (")[0]: float(re.findall(r"[-+]?\d+\.\d+", r.split("|")[6])[0])
            for r in rows}  # fmt: skip
    assert lows["rest of warmup"] <= 0 and lows["W-2W"] <= 0  # neither window's interval lies above 0
    assert "the scale-free variance of ln ψ did not rise in either window" in README


def test_the_pre_registered_regimes_held_out_error_is_the_pilots():
    """The README's "about 55 %" for plain AdamW in the v4 regime is the pilot's validation error (no test set)."""
    runs = json.loads((ROOT / "docs" / "study-v4-pilot.json").read_text())["runs"]
    error = statistics.mean(100 * r["metrics"]["eval_error_rate"] for r in runs if r["arm"] == "plain")
    assert round(error) == 55
    assert "a held-out error near 10–16 % instead of about 55 % (the pilot's validation error)" in README
