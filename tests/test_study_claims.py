"""The README's CPU-study numbers are the committed study's: each paired difference it quotes is recomputed here
from the per-run records in docs/ with scipy (independently of scripts/compare_stats.py), and each mechanism
figure is looked up in the generated report's window table."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import re
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml
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
VERSIONS = [
    ("study-cpu-short", "[short]"),
    ("study-cpu-1280", "1,280 steps"),
    ("study-cpu", "[2,400 steps]"),
    ("study-v4", "[v4]"),
]


@pytest.mark.parametrize("study, row", VERSIONS, ids=[s for s, _ in VERSIONS])
def test_the_table_of_study_versions_is_the_records(study, row):
    line = next(x for x in README_LINES if x.startswith(f"| {row}"))
    for a, b in (("gr", "plain"), ("zero-warmup", "gr")):
        mean, low, high, _ = _paired(study, a, b)
        assert f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]" in line, (a, b)
    arms = ("plain", "gr", "zero-warmup")
    seeds = len(set.intersection(*(set(_metric(study, arm, "test_error_rate")) for arm in arms)))
    assert f"| {seeds} |" in line


def test_the_adjusted_p_and_the_regime_of_the_1280_step_version_are_the_records():
    pairs = TEST_ERROR_CLAIMS[:7] + [("study-cpu", "plain", "plain-no-lr-warmup")]  # the study's 8 contrasts
    ps = [_paired(*pair)[3] for pair in pairs]
    assert f"Holm over the study's 8 test-error contrasts: p = {_holm(ps)[0]:.2f})" in README
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


# Study v4, the pre-registered one (docs/study-protocol.md).
V4_CONFIG = yaml.safe_load((ROOT / "configs" / "study" / "v4.yaml").read_text())
V4_RUNS = json.loads((ROOT / "docs" / "study-v4.json").read_text())


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _needs_history() -> None:
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() != "false":
        pytest.skip("needs the whole git history (not a shallow clone or an export)")


def test_the_protocol_predates_every_v4_record():
    """The protocol's last change is an ancestor of the first commit that holds a v4 record."""
    _needs_history()
    protocol = _git("log", "-1", "--format=%H", "--", "docs/study-protocol.md").stdout.strip()
    first = _git("log", "--reverse", "--format=%H", "--", "docs/study-v4.json").stdout.split()[0]
    assert protocol != first and _git("merge-base", "--is-ancestor", protocol, first).returncode == 0
    assert json.loads(_git("show", f"{first}:docs/study-v4.json").stdout)["runs"]  # that commit holds a record
    assert "configs/study/v4.yaml" in _git("show", "--name-only", "--format=", protocol).stdout


def _v4_in_progress() -> bool:
    """The README says so while the study runs; once it does not, the study must be complete."""
    return "**The pre-registered study (v4, in progress).**" in README


def _v4_seeds() -> int:
    """How many seeds all three arms have recorded."""
    return len(set.intersection(*(set(_metric("study-v4", arm, "test_error_rate")) for arm in V4_CONFIG["arms"])))


def test_the_v4_study_is_complete_with_finite_results_and_full_environments():
    runs = V4_RUNS["runs"]
    assert _v4_in_progress() == (len(runs) < 36)
    if _v4_in_progress():
        pytest.skip(f"study v4 in progress: {len(runs)} of 36 runs recorded")
    assert len(V4_CONFIG["seeds"]) == 12  # the protocol's n
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted(
        itertools.product(V4_CONFIG["arms"], V4_CONFIG["seeds"])
    )
    for run in runs:
        assert all(math.isfinite(run["metrics"][key]) for key in V4_CONFIG["metrics"]), (run["arm"], run["seed"])
        env = run["environment"]
        assert {"torch", "transformers", "accelerate", "datasets", "numpy", "pyarrow", "pillow"} <= set(
            env["packages"]
        )
        assert env["data_sha256"] and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in env["data_sha256"].values())
        assert re.fullmatch(r"[0-9a-f]{40}", env["commit"]) and env["dirty"] is False
        load = env["load_average_at_start"]
        assert env["threads"] == 1 and len(load) == 3 and all(math.isfinite(x) for x in load)


def test_the_v4_regime_in_the_table_of_versions_is_the_configurations():
    """0.8 M parameters, 2,000 images × 2,400 steps: the training rows and the steps the configuration gives."""
    base, (_, first, end) = V4_CONFIG["base"], V4_CONFIG["data"]["splits"]["train"]
    steps = base["num_train_epochs"] * math.ceil((end - first) / base["per_device_train_batch_size"])
    line = next(x for x in README_LINES if x.startswith("| [v4]"))
    assert f"| 0.8 M parameters, {end - first:,} images × {steps:,} steps |" in line
    assert "hidden_size=128,num_hidden_layers=6" in base["config_overrides"]  # the 0.82 M-parameter ViT of the pilot


def test_the_v4_configuration_changed_after_the_first_record_only_by_a_reporting_key():
    """The regime, arms, seeds, tests and windows are as they were when the first run started; the one line added
    since labels report rows (`secondary`)."""
    _needs_history()
    first = _git("log", "--reverse", "--format=%H", "--", "docs/study-v4.json").stdout.split()[0]
    diff = _git("diff", "-U0", first, "--", "configs/study/v4.yaml").stdout.splitlines()
    changed = [x for x in diff if x[:1] in "+-" and not x.startswith(("+++", "---"))]
    assert all(x.startswith("+secondary: [test_loss]") for x in changed), changed


def test_the_v4_re_run_of_plain_seed_0_matched_its_record_bit_for_bit():
    if _v4_in_progress():
        pytest.skip("study v4 in progress: the re-run follows the last run")
    checks = [c for c in V4_RUNS.get("rechecks", []) if (c["arm"], c["seed"]) == ("plain", 0)]
    assert checks and all(c["identical"] and c["differences"] == [] and c["dirty"] is False for c in checks)


def _holm(p_values: list[float]) -> list[float]:
    order, adjusted, running = sorted(range(len(p_values)), key=lambda i: p_values[i]), [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _sign_flip(diffs: list[float]) -> float:
    observed = abs(sum(diffs)) * (1 - 1e-12)
    patterns = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed for signs in patterns) / len(patterns)


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


HYPOTHESES = [("H1 (harm)", "GR - plain", "gr", "plain"), ("H2 (repair)", "zero-warmup - GR", "zero-warmup", "gr")]


def test_the_pre_registered_hypotheses_are_worded_by_their_holm_adjusted_tests():
    results = [_paired("study-v4", a, b) for _, _, a, b in HYPOTHESES]
    holm = _holm([r[3] for r in results])
    for (name, pair, _, _), (mean, low, high, _), p in zip(HYPOTHESES, results, holm):
        reading = ("higher" if mean > 0 else "lower") if p < 0.05 else (
            f"no evidence of a difference (95 % CI [{low:+.2f}, {high:+.2f}])")  # fmt: skip
        assert (
            f"**{name}: {pair} {mean:+.2f} (95 % CI [{low:+.2f}, {high:+.2f}]), Holm {_p_text(p)}: {reading}.**"
            in README
        )
    diffs = []
    for _, _, a, b in HYPOTHESES:
        xa, xb = _metric("study-v4", a, "test_error_rate"), _metric("study-v4", b, "test_error_rate")
        diffs.append([100 * (xa[seed] - xb[seed]) for seed in sorted(xa.keys() & xb.keys())])
    flips = _holm([_sign_flip(d) for d in diffs])
    agree = all((p < 0.05) == (f < 0.05) for p, f in zip(holm, flips))
    verb = "agrees" if agree else "disagrees"
    assert f"sensitivity check, {verb}: Holm p = {flips[0]:.2g} and {flips[1]:.2g}" in README


def test_the_v4_secondary_and_exploratory_numbers_are_the_records():
    for text, a, b in (("test NLL GR - plain", "gr", "plain"), ("zero-warmup - GR", "zero-warmup", "gr")):
        mean, low, high, p = _paired("study-v4", a, b, "test_loss", 1)
        assert f"{text} {mean:+.2f} ([{low:+.2f}, {high:+.2f}], {_p_text(p)})" in README
    mean, low, high, p = _paired("study-v4", "zero-warmup", "plain")
    assert (
        f"Exploratory: zero-warmup - plain {mean:+.2f} ([{low:+.2f}, {high:+.2f}], {_p_text(p)} unadjusted)" in README
    )
    mean, low, high, p = _paired("study-v4", "gr", "plain", "train_clean_error_rate")
    assert f"clean training images {mean:+.1f} points ([{low:+.1f}, {high:+.1f}], {_p_text(p)} unadjusted)" in README
    test, train = (100 * statistics.mean(_metric("study-v4", "plain", key).values())
                   for key in ("test_error_rate", "train_clean_error_rate"))  # fmt: skip
    assert f"Plain AdamW erred on {test:.1f} % of them and on {train:.1f} % of its own training images" in README
    assert f"3 arms × {_v4_seeds()} seeds" in README and _v4_seeds() == len(V4_CONFIG["seeds"])


def test_the_v4_mechanism_table_sits_beside_its_pairs_and_is_the_histories():
    """Each README cell, recomputed from the committed per-step histories: each run's mean of the statistic over
    the window, per seed 100·(a − b)/|b|, their mean and 95 % t-interval ("no evidence" when it contains 0); the
    columns name the pair and the window (the protocol's, as in the configuration)."""
    histories = json.loads(gzip.decompress((ROOT / "docs" / "study-v4-histories.json.gz").read_bytes()))
    windows = {name: tuple(bounds) for name, bounds in V4_CONFIG["per_step"]["windows"].items()}
    assert windows == {"LR warmup": (1, 312), "W–2W": (313, 624)}  # the protocol's
    arms = {"GR - plain": ("gr", "plain"), "zero-warmup - GR": ("zero-warmup", "gr")}

    def window_mean(history: dict, key: str, first: int, last: int) -> float | None:
        values = [v for step, v in zip(*history.get(key, [[], []])) if first <= step <= last and math.isfinite(v)]
        return sum(values) / len(values) if values else None

    header = next(x for x in README_LINES if x.startswith("| statistic | GR - plain, LR warmup"))
    columns = []
    for title in [c.strip() for c in header.strip("|").split("|")[1:]]:
        pair, window = title.split(", ")
        name, bounds = window.split(" (")
        assert tuple(int(x) for x in bounds.rstrip(")").split("–")) == windows[name]
        columns.append((arms[pair], windows[name]))
    keys = {"‖g1‖": "gr_grad_norm", "‖g2‖": "gr_perturbed_grad_norm", "mean of ψ": "adaptive_psi_mean",
            "variance of ψ": "adaptive_psi_var", "variance of ln ψ (scale-free)": "adaptive_lr_log_var",
            "update size ‖Δθ‖/lr": "update_size"}  # fmt: skip
    assert set(keys.values()) == set(V4_CONFIG["per_step"]["keys"])
    numbers = 0
    for name, key in keys.items():
        line = next(x for x in README_LINES if x.startswith(f"| {name} |"))
        for ((a, b), (first, last)), cell in zip(columns, [c.strip() for c in line.strip("|").split("|")[1:]]):
            relative = []
            for seed in V4_CONFIG["seeds"]:
                ha, hb = histories.get(f"{a}-seed{seed}"), histories.get(f"{b}-seed{seed}")
                ma = window_mean(ha, key, first, last) if ha else None
                mb = window_mean(hb, key, first, last) if hb else None
                if ma is not None and mb is not None:
                    relative.append(100 * (ma - mb) / abs(mb))
            if not relative:
                assert cell == "—", (name, a, b, first)
                continue
            low, high = stats.t.interval(0.95, len(relative) - 1, statistics.mean(relative), stats.sem(relative))
            mean = statistics.mean(relative)
            expected = (f"no evidence ([{low:+.1f}, {high:+.1f}] %)" if low <= 0 <= high
                        else f"{mean:+.1f} % [{low:+.1f}, {high:+.1f}]")  # fmt: skip
            assert cell == expected, (name, a, b, first)
            numbers += 1
    assert numbers >= 20


def _committed_reports() -> list[Path]:
    return [path for path in sorted((ROOT / "configs" / "study").glob("*.yaml"))
            if (ROOT / "docs" / f"{yaml.safe_load(path.read_text())['name']}.md").is_file()]  # fmt: skip


@pytest.mark.parametrize("config_path", _committed_reports(), ids=lambda p: p.stem)
def test_each_committed_report_is_what_report_only_writes(config_path, monkeypatch):
    """`compare.py CONFIG --report_only` rebuilds each committed study report from its records, character for
    character (the markdown; the figure is not compared)."""
    import compare
    import compare_report

    monkeypatch.chdir(ROOT)
    config = compare.load_config(config_path.relative_to(ROOT))
    docs = ROOT / config["docs_dir"]
    data = json.loads((docs / f"{config['name']}.json").read_text())
    histories = json.loads(gzip.decompress((docs / f"{config['name']}-histories.json.gz").read_bytes()))
    assert compare_report.markdown(config, data, histories) == (docs / f"{config['name']}.md").read_text()


def test_the_warmup_page_quotes_the_pre_registered_tests():
    page = _text(ROOT / "docs" / "warmup.md")
    results = [_paired("study-v4", a, b) for _, _, a, b in HYPOTHESES]
    holm = _holm([r[3] for r in results])
    for (who, than), (mean, low, high, _), p in zip([("GR", "plain AdamW"), ("zero-warmup", "GR")], results, holm):
        if p < 0.05:
            direction = "higher" if mean > 0 else "lower"
            expected = f"{who}'s test error was {direction} than {than}'s ({mean:+.2f} points, 95 % CI "
        else:
            expected = f"{who} - {than} showed no evidence of a difference (95 % CI "
        expected += f"[{low:+.2f}, {high:+.2f}], Holm {_p_text(p)})"
        assert expected in page
    assert f"AdamW with LR warmup, {_v4_seeds()} seeds)" in page
