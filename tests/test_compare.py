"""scripts/compare.py: a tiny A/B comparison end to end (2 arms × 2 seeds × a few steps of train.py on the bundled
digits), its records, the report's statistics against scipy, resuming, and `--report_only` from the committed
files; the paired statistics and their wording against scipy."""

import gzip
import io
import itertools
import json
import math
import re
import sys

import compare
import compare_stats as cs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from scipy import stats
from sklearn.datasets import load_digits

TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


def digits_parquet(path, rows=260):
    """The first `rows` digits as a Hub-layout parquet file: img {bytes, path} (PNG) and label."""
    digits = load_digits()
    cells = []
    for image in digits.images[:rows]:
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image * 16, 0, 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    table = pa.table({"img": cells, "label": pa.array(digits.target[:rows], pa.int64())})
    pq.write_table(table, path)


def write_config(tmp_path, **changes):
    digits_parquet(tmp_path / "digits.parquet")
    config = {
        "name": "ab",
        "title": "tiny A/B",
        "output_dir": str(tmp_path / "runs"),
        "docs_dir": str(tmp_path / "docs"),
        "data": {
            "source": str(tmp_path),
            "splits": {
                "train": ["digits.parquet", 0, 96],
                "validation": ["digits.parquet", 96, 160],
                "test": ["digits.parquet", 160, 260],
            },
        },  # fmt: skip
        "base": {
            "train_file": "{data}/train.parquet",
            "validation_file": "{data}/validation.parquet",
            "test_files": ["test={data}/test.parquet"],
            "model_config": "vit-ti",
            "config_overrides": TINY,
            "augmentation": "none",
            "max_steps": 6,
            "per_device_train_batch_size": 16,
            "learning_rate": 0.01,
            "warmup_steps": 2,
            "gr_warmup_steps": 2,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "logging_steps": 1,
            "gr_diagnostics_steps": 1,
            "save_strategy": "no",
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
        },  # fmt: skip
        "arms": {"plain": {"gr_lambda": 0.0}, "gr": {"gr_lambda": 0.1, "gr_r": 0.1, "gr_warmup_strategy": "none"}},
        "seeds": [0, 1],
        "pool": 2,
        "metrics": ["test_error_rate", "eval_loss"],
        "pairs": [["gr", "plain"]],
        "per_step": {
            "keys": ["gr_grad_norm", "adaptive_psi_mean", "update_size"],  # update_size: NaN at step 1
            "pairs": [["gr", "plain"]],
            "windows": {"early": [1, 3], "late": [4, 6]},
        },  # fmt: skip
        **changes,
    }
    path = tmp_path / "ab.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def report_row(text, metric):
    """(mean, low, high, p, reads) of the report's "gr − plain" row for `metric`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) in (8, 9) and cells[0] == "gr − plain" and cells[1].startswith(metric):  # 9: with a role
            low, high = map(float, re.findall(r"[-+][\d.]+", cells[5]))
            return float(cells[3]), low, high, float(cells[6]), cells[7]
    raise AssertionError(f"no gr − plain row for {metric}")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    config = write_config(tmp_path, hypotheses=[{"name": "H1", "pair": ["gr", "plain"]},
                                                {"name": "H2", "pair": ["plain", "gr"]}])  # fmt: skip
    assert compare.main([str(config)]) == 0
    return tmp_path, config


@pytest.mark.slow  # two train.py subprocesses
def test_a_pre_registered_study_logs_validation_not_test_results_as_it_runs(tmp_path, capsys):
    config = write_config(tmp_path, seeds=[0], curve="eval_error_rate", per_step={},
                          hypotheses=[{"name": "H", "pair": ["gr", "plain"]}])  # fmt: skip
    assert compare.main([str(config)]) == 0
    done = [line for line in capsys.readouterr().out.splitlines() if " done " in line]
    assert len(done) == 2 and all(": eval_error_rate 0." in line and "test_" not in line for line in done), done


def test_records_hold_metrics_cost_and_environment(study):
    tmp_path, _ = study
    data = json.loads((tmp_path / "docs" / "ab.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {("plain", 0), ("plain", 1), ("gr", 0), ("gr", 1)}
    for (arm, seed), run in runs.items():
        assert run["args"]["seed"] == seed and run["steps"] == 6
        assert 0 <= run["metrics"]["test_error_rate"] <= 1 and "eval_error_rate" in run["metrics"]
        env = run["environment"]
        assert {"torch", "transformers", "accelerate", "cpu", "threads", "device"} <= set(env)
        assert env["threads"] == 1 and env["device"] == "cpu"
        share = 1.0 if arm == "gr" else 0.0  # GR without a GR warmup strategy: every step a GR step
        assert run["gr_step_fraction"] == share and run["forward_backward_passes"] == 6 * (1 + share)
        # The test set is evaluated once, after training; the validation set during training.
        folder = tmp_path / "runs" / f"{arm}-seed{seed}"
        log = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        assert not [e for e in log if "test_error_rate" in e]
        assert [e["step"] for e in log if "eval_error_rate" in e] == [3, 6]
        final = json.loads((folder / "test_results.json").read_text())
        assert final["test_error_rate"] == run["metrics"]["test_error_rate"]
    # Same seed, same initial weights and data: GR and plain agree on ‖g‖ at step 1 (both a plain gradient).
    hist = json.loads(gzip.decompress((tmp_path / "docs" / "ab-histories.json.gz").read_bytes()))
    assert set(hist) == {"plain-seed0", "plain-seed1", "gr-seed0", "gr-seed1"}
    first = [hist[f"{arm}-seed0"]["gr_grad_norm"][1][0] for arm in ("gr", "plain")]
    assert first[0] == pytest.approx(first[1], rel=1e-4)
    assert hist["gr-seed0"]["adaptive_psi_mean"][0] == [1, 2, 3, 4, 5, 6]


def test_report_statistics_match_scipy(study):
    tmp_path, _ = study
    data = json.loads((tmp_path / "docs" / "ab.json").read_text())
    text = (tmp_path / "docs" / "ab.md").read_text()
    for metric, factor in (("test_error_rate", 100), ("eval_loss", 1)):
        value = {(r["arm"], r["seed"]): factor * r["metrics"][metric] for r in data["runs"]}
        diffs = np.array([value["gr", s] - value["plain", s] for s in (0, 1)])
        mean, low, high, p, reads = report_row(text, metric)
        assert mean == pytest.approx(diffs.mean(), abs=0.006)
        if np.ptp(diffs) == 0:
            continue
        want_low, want_high = stats.t.interval(0.95, 1, loc=diffs.mean(), scale=stats.sem(diffs))
        assert (low, high) == (pytest.approx(want_low, abs=0.006), pytest.approx(want_high, abs=0.006))
        want_p = stats.ttest_rel([value["gr", s] for s in (0, 1)], [value["plain", s] for s in (0, 1)]).pvalue
        assert p == pytest.approx(want_p, rel=1e-2)
        if metric == "test_error_rate":  # H1's metric and pair: it reads by its Holm p, in the tests' table
            assert reads == "see the pre-registered tests below (Holm-adjusted)"
        else:
            assert reads.startswith("no evidence of a difference (95 % CI [") if want_p >= 0.05 else "p = " in reads
    assert (tmp_path / "docs" / "ab.png").stat().st_size > 10_000

    # The per-step window: each run's mean ‖g1‖ over steps 4–6, from its own trainer_state.json, paired by seed.
    def window(arm, seed):
        log = json.loads((tmp_path / "runs" / f"{arm}-seed{seed}" / "trainer_state.json").read_text())["log_history"]
        return np.mean([e["gr_grad_norm"] for e in log if "gr_grad_norm" in e and 4 <= e["step"] <= 6])

    diffs = [window("gr", s) - window("plain", s) for s in (0, 1)]
    (row,) = [line for line in text.splitlines() if line.startswith("| gr − plain | gr_grad_norm | late (4–6)")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[4]) == pytest.approx(np.mean(diffs), rel=1e-3)
    assert float(cells[6]) == pytest.approx(stats.ttest_rel(*zip(*[(d, 0.0) for d in diffs])).pvalue, rel=1e-2)


def test_resume_runs_nothing_twice(study, capsys):
    tmp_path, config = study
    marker = tmp_path / "runs" / "gr-seed1" / "compare_run.json"
    before = marker.stat().st_mtime_ns
    # A finished run folder whose record was lost is recorded again, not re-run.
    path = tmp_path / "docs" / "ab.json"
    data = json.loads(path.read_text())
    data["runs"] = [r for r in data["runs"] if not (r["arm"] == "gr" and r["seed"] == 1)]
    path.write_text(json.dumps(data))
    assert compare.main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "1 runs to do, 3 recorded" in out and "start" not in out
    stamps = [re.findall(r"\d\d:\d\d:\d\d ", line) for line in out.splitlines()]
    assert all(len(found) == 1 and line.startswith(found[0]) for found, line in zip(stamps, out.splitlines()))
    assert f"report: {tmp_path / 'docs' / 'ab'}.md" in out and "warning: gr − plain: 2 seed(s) are too few" in out
    assert marker.stat().st_mtime_ns == before
    assert len(json.loads(path.read_text())["runs"]) == 4
    assert compare.main([str(config)]) == 0
    assert "0 runs to do, 4 recorded" in capsys.readouterr().out


def test_report_only_rebuilds_from_the_committed_files_and_refuses_without_histories(study, capsys):
    tmp_path, config = study
    docs = tmp_path / "docs"
    text = (docs / "ab.md").read_text()
    (docs / "ab.md").unlink()
    (docs / "ab.png").unlink()
    runs = tmp_path / "runs"
    runs.rename(tmp_path / "runs-gone")  # the run folders are not needed
    try:
        assert compare.main([str(config), "--report_only"]) == 0
        assert (docs / "ab.md").read_text() == text and (docs / "ab.png").is_file()
        histories = docs / "ab-histories.json.gz"
        stored = json.loads(gzip.decompress(histories.read_bytes()))
        del stored["plain-seed1"]
        histories.write_bytes(gzip.compress(json.dumps(stored).encode()))
        assert compare.main([str(config), "--report_only"]) == 2
        assert "lacks the histories of plain-seed1" in capsys.readouterr().err
        histories.unlink()
        assert compare.main([str(config), "--report_only"]) == 2
        assert "ab-histories.json.gz; it is missing" in capsys.readouterr().err
    finally:
        (tmp_path / "runs-gone").rename(runs)


def test_paired_statistics_and_the_t_distribution_match_scipy(monkeypatch):
    a, b = [61.2, 60.1, 62.3, 59.8, 60.9], [60.0, 59.9, 61.0, 58.7, 60.1]
    diffs = [x - y for x, y in zip(a, b)]
    s = cs.paired(diffs)
    want = stats.ttest_rel(a, b)
    low, high = stats.t.interval(0.95, 4, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert (s["mean"], s["se"]) == (pytest.approx(np.mean(diffs)), pytest.approx(stats.sem(diffs)))
    assert (s["low"], s["high"], s["p"]) == (pytest.approx(low), pytest.approx(high), pytest.approx(want.pvalue))
    assert cs.claim(s) == f"higher (p = {want.pvalue:.2g})"
    assert cs.claim(cs.paired([-d for d in diffs])).startswith("lower (p = ")
    noisy = cs.paired([1.0, -0.5, 0.8, -0.9])
    assert noisy["p"] > 0.05
    assert cs.claim(noisy) == f"no evidence of a difference (95 % CI [{noisy['low']:.2f}, {noisy['high']:.2f}])"
    # Without scipy: the continued-fraction t distribution gives scipy's numbers.
    monkeypatch.setitem(sys.modules, "scipy", None)
    for t, df in ((0.3, 1), (2.1, 4), (5.0, 9), (1.0, 30)):
        assert cs.t_sf2(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)
    for df in (1, 4, 9):
        assert cs.t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    assert cs.paired(diffs)["p"] == pytest.approx(want.pvalue, rel=1e-9)
    assert math.isnan(cs.paired([1.0])["p"]) and cs.claim(cs.paired([1.0])) == "not enough seeds (needs 2)"


def test_bad_configurations_are_refused_by_name(tmp_path):
    with pytest.raises(compare.ConfigError, match=r"pair \['gr', 'nope'\] must name two arms of: gr, plain"):
        compare.load_config(write_config(tmp_path, pairs=[["gr", "nope"]]))
    with pytest.raises(compare.ConfigError, match="unknown key.*arm_list"):
        compare.load_config(write_config(tmp_path, arm_list=[]))
    with pytest.raises(compare.ConfigError, match="'secondary' must list metrics of 'metrics' after the first"):
        compare.load_config(write_config(tmp_path, secondary=["test_loss"]))  # not among the metrics, no hypotheses
    with pytest.raises(compare.ConfigError, match="'secondary' must list metrics"):
        compare.load_config(write_config(tmp_path, secondary=[{"test_loss": 1}]))
    config = compare.load_config(write_config(tmp_path))
    config["data"]["splits"]["test"] = ["digits.parquet", 150, 200]
    with pytest.raises(compare.ConfigError, match="validation rows 96–160 of digits.parquet overlap test.s"):
        compare.prepare_data(config)


def test_test_files_are_name_equals_path(tmp_path):
    import image_data

    digits_parquet(tmp_path / "d.parquet", rows=20)
    assert len(image_data.load_test_sets([f"held_out={tmp_path / 'd.parquet'}"])["held_out"]) == 20
    for bad in ("d.parquet", "eval=x.parquet", "my-set=x.parquet"):
        with pytest.raises(image_data.InputError, match="--test_files takes 'name=path'"):
            image_data.load_test_sets([bad])


def test_a_gr_step_with_sub_batch_ascent_counts_one_plus_f_passes():
    """Pass 1 of a `gr_ascent_fraction` f step sees a fraction f of the batch: the step costs 1 + f passes."""
    assert compare.ascent_fraction({}) == 1.0
    assert compare.ascent_fraction({"gr_ascent_fraction": 0.25}) == 0.25
    assert compare.ascent_fraction({"gr_ascent_fraction": None}) == 1.0


def test_holm_sign_flip_and_power_against_independent_values():
    # Holm (1979) by hand: p = (0.01, 0.04, 0.03) → (0.03, 0.06, 0.06)
    assert cs.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert cs.holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])
    # sign flips of (1, 2, 3): |sums| of the 8 patterns are 6, 4, 2, 0, 0, 2, 4, 6; two reach 6
    assert cs.sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    assert cs.sign_flip_p([1.0, -1.0]) == 1.0
    # the standard table: a paired t-test at 0.05 needs n = 10 for power 0.8 at effect/sd = 1 (power 0.803)
    assert cs.paired_t_power(10, 1.0, 1.0, 0.05) == pytest.approx(0.8031, abs=5e-4)
    assert cs.seeds_for_power(1.0, 1.0, 0.05) == 10
    # power by simulation (independent of the noncentral t): n = 8, effect 1, sd 1.2, α 0.025
    rng = np.random.default_rng(0)
    draws = rng.normal(1.0, 1.2, size=(20000, 8))
    simulated = np.mean(stats.ttest_1samp(draws, 0.0, axis=1).pvalue < 0.025)
    assert cs.paired_t_power(8, 1.0, 1.2, 0.025) == pytest.approx(simulated, abs=0.01)


def test_the_report_says_where_the_sign_flip_test_disagrees_with_the_t_test():
    import compare_report

    config = {"metrics": ["test_error_rate"], "hypotheses": [{"name": "H1", "pair": ["gr", "plain"]}]}

    def runs(gaps: list[float]) -> list[dict]:
        plain = [{"arm": "plain", "seed": s, "metrics": {"test_error_rate": 0.5}} for s in range(len(gaps))]
        return plain + [{"arm": "gr", "seed": s, "metrics": {"test_error_rate": 0.5 + g}} for s, g in enumerate(gaps)]

    # 5 seeds, all +1.0..1.4 points: t p ≈ 1e-4, but 5 sign flips cannot go below 2/32 = 0.0625
    gaps = [0.010, 0.011, 0.012, 0.013, 0.014]
    assert stats.ttest_1samp([100 * g for g in gaps], 0.0).pvalue < 0.05 and 2 / 32 > 0.05
    text = compare_report.hypotheses_text(config, runs(gaps))
    assert "**H1: the tests disagree.** The t-test's Holm p is" in text and "sign-flip test's 0.0625" in text
    # 8 seeds the same way: both below 0.05 (sign flip 2/256)
    text = compare_report.hypotheses_text(config, runs(gaps + [0.010, 0.012, 0.011]))
    assert "disagree" not in text and "The sign-flip test agrees with the t-test on every hypothesis." in text


def test_a_pre_registered_reports_rows_say_what_the_protocol_planned_them_to_be():
    import compare_report

    config = {"metrics": ["test_error_rate", "test_loss", "train_clean_error_rate"], "secondary": ["test_loss"],
              "pairs": [["gr", "plain"], ["zero", "plain"]], "labels": {},
              "hypotheses": [{"name": "H1", "pair": ["gr", "plain"]}]}  # fmt: skip
    runs = [{"arm": arm, "seed": s, "metrics": {"test_error_rate": 0.5 + 0.01 * s * (arm != "plain"),
                                                 "test_loss": 1.0 + 0.1 * s, "train_clean_error_rate": 0.1}}
            for arm in ("plain", "gr", "zero") for s in range(3)]  # fmt: skip
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.strip("|").split("|")[-1].strip()
            for line in compare_report.pair_table(config, runs).splitlines()[2:]}  # fmt: skip
    table = compare_report.pair_table(config, runs)
    assert "| primary (H1) |" in table and table.count("see the pre-registered tests below (Holm-adjusted)") == 1
    assert rows == {("gr − plain", "test_error_rate (%)"): "primary (H1)", ("gr − plain", "test_loss"): "secondary",
                    ("gr − plain", "train_clean_error_rate (%)"): "exploratory",
                    ("zero − plain", "test_error_rate (%)"): "exploratory",
                    ("zero − plain", "test_loss"): "exploratory",
                    ("zero − plain", "train_clean_error_rate (%)"): "exploratory"}  # fmt: skip
    assert compare_report.role(config, "gr", "plain") == "secondary"  # a per-step window of a hypothesis's pair
    assert compare_report.role(config, "plain", "gr", "test_error_rate") == "exploratory"  # the reversed pair
    del config["hypotheses"]
    assert "role" not in compare_report.pair_table(config, runs)  # a study that pre-registered nothing


def test_the_report_warns_of_few_seeds_and_gives_the_pre_registered_tests(study):
    tmp_path, _ = study
    text = (tmp_path / "docs" / "ab.md").read_text()
    data = json.loads((tmp_path / "docs" / "ab.json").read_text())
    runs = {(r["arm"], r["seed"]): r["metrics"]["test_error_rate"] * 100 for r in data["runs"]}
    diffs = [runs["gr", s] - runs["plain", s] for s in (0, 1)]
    assert "**Few seeds.** gr − plain: 2 seed(s) are too few" in text
    p = stats.ttest_rel([runs["gr", s] for s in (0, 1)], [runs["plain", s] for s in (0, 1)]).pvalue
    flips = [abs(sum(sign * d for sign, d in zip(signs, diffs))) for signs in itertools.product((1, -1), repeat=2)]
    flip_p = sum(f >= abs(sum(diffs)) * (1 - 1e-12) for f in flips) / 4
    for name in ("H1", "H2"):  # the same |difference| twice: Holm doubles both p (capped at 1)
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[5]) == pytest.approx(p, rel=1e-2)
        assert float(cells[6]) == pytest.approx(min(1.0, 2 * p), rel=1e-2)
        assert float(cells[7]) == pytest.approx(min(1.0, 2 * flip_p), rel=1e-2)


def test_one_pass_sam_counts_one_pass_per_step_and_one_more_for_its_first():
    previous = {"gr_ascent_direction": "previous_step", "gr_warmup_strategy": "none"}
    assert compare.passes(previous, 10, 2, 1.0) == 10 * 2 + 2  # the first GR step, without a D, takes two
    assert compare.passes({**previous, "gr_warmup_strategy": "zero"}, 10, 2, 0.8) == 20  # D from the plain steps
    assert compare.passes({}, 10, 2, 0.5) == round(10 * 2 * 1.5)
    assert compare.passes({"gr_ascent_fraction": 0.25}, 8, 1, 1.0) == 10


def test_the_report_lists_a_shared_environment_once_and_names_what_differs():
    import compare_report

    cells = ((0.5, "2.4.6", "abc"), (2.25, "2.4.6", "abc"), (1.0, "2.5.0", "def"))
    runs = [{"environment": {"torch": "2.13.0", "threads": 1, "load_average_at_start": [load, 1.0, 1.0],
                             "numpy": numpy, "commit": commit}} for load, numpy, commit in cells]  # fmt: skip
    text = compare_report.environment_text(runs)
    assert "- threads: 1\n- torch: 2.13.0" in text
    assert "- load_average_at_start (1 minute): 0.50–2.25, each run's in the JSON" in text
    assert "- numpy: 2 different values, each run's in the JSON" in text
    assert text.endswith("(differing between runs: numpy; code at commit(s) abc, def.)")
    same = compare_report.environment_text(runs[:1])
    assert same.endswith("(the same for every run; code at commit(s) abc.)") and "- load_average" in same


def test_a_rerun_of_a_recorded_cell_is_checked_and_recorded(study, capsys):
    """`--arms plain --seeds 0` re-runs that cell beside the study and compares it with its record, bit for bit; the
    outcome is kept in the JSON and the report. A record that no longer matches is named, and the exit code is 1."""
    tmp_path, config = study
    path = tmp_path / "docs" / "ab.json"
    original = path.read_text()
    try:
        assert compare.main([str(config), "--arms", "plain", "--seeds", "0"]) == 0
        assert "plain seed 0: identical to its record (metrics, steps, weights)" in capsys.readouterr().out
        (check,) = json.loads(path.read_text())["rechecks"]
        assert check["identical"] and check["differences"] == [] and (check["arm"], check["seed"]) == ("plain", 0)
        assert "Re-run of plain seed 0 (code at commit" in (tmp_path / "docs" / "ab.md").read_text()
        data = json.loads(path.read_text())
        record = next(r for r in data["runs"] if (r["arm"], r["seed"]) == ("plain", 0))
        record["metrics"]["test_error_rate"] += 0.01  # a record the re-run cannot reproduce
        path.write_text(json.dumps(data))
        assert compare.main([str(config), "--arms", "plain", "--seeds", "0"]) == 1
        assert "not done: plain seed 0 differs from its record: test_error_rate: recorded" in capsys.readouterr().err
        assert "Re-run of plain seed 0 (code at commit" in (tmp_path / "docs" / "ab.md").read_text()
        assert "DIFFERENT from its record: test_error_rate" in (tmp_path / "docs" / "ab.md").read_text()
    finally:
        path.write_text(original)
