"""scripts/study_warmup.py without training: each configuration's command line (parsed by train.py's own parser),
the equal-compute epochs, mean ± std over seeds, resuming (finished runs skipped, the equal-time baseline after
zero-warmup and plain), and `--report_only` on a synthetic study."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_warmup.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_warmup", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTINGS = {
    "train_rows": 1000, "epochs": 10, "batch_size": 100, "learning_rate": 1e-3, "weight_decay": 0.3,
    "warmup_fraction": 0.13, "max_grad_norm": 5.0, "gr_r": 0.1, "evals": 4, "diagnostics_steps": 10,
    "model": "hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128",
    "seeds": [0, 1, 2], "configs": None,
}  # fmt: skip


def settings(study, **changes):
    return {**SETTINGS, "configs": list(study.CONFIGS), **changes}


def flags(command):
    """{flag: value} of a train.py command line (the arguments after the script)."""
    args = command[2:]
    return dict(zip(args[::2], args[1::2]))


def test_commands_carry_each_configurations_flags(study, tmp_path):
    s = settings(study)
    expected = {
        "plain": {"--gr_lambda": "0"},
        "gr": {"--gr_lambda": "0.1", "--gr_r": "0.1", "--gr_warmup_strategy": "none"},
        "lambda-warmup": {"--gr_warmup_strategy": "lambda"},
        "r-warmup": {"--gr_warmup_strategy": "r"},
        "zero-warmup": {"--gr_warmup_strategy": "zero", "--gr_lambda": "0.1"},
        "zero-warmup-p0.5": {"--gr_warmup_strategy": "zero", "--gr_probability": "0.5"},
        "zero-warmup-k4-reuse": {"--gr_warmup_strategy": "zero", "--gr_interval": "4", "--gr_reuse": "true"},
        "plain-equal-time": {"--gr_lambda": "0"},
    }
    assert set(expected) == set(study.CONFIGS)
    for config, wanted in expected.items():
        given = flags(study.train_command(s, config, 2, tmp_path / config, 10))
        assert {k: given.get(k) for k in wanted} == wanted, config
        # 100 steps: W = 13 steps for both the LR and the GR warmup; 4 evals on all 10,000 test rows.
        assert given["--warmup_steps"] == given["--gr_warmup_steps"] == "13"
        assert given["--eval_steps"] == "25" and "--max_eval_samples" not in given
        assert given["--seed"] == "2" and given["--num_train_epochs"] == "10"
        assert given["--gr_diagnostics_steps"] == "10" and given["--augmentation"] == "basic"
        if config not in ("zero-warmup-p0.5",):
            assert "--gr_probability" not in given
    assert "--gr_warmup_strategy" not in flags(study.train_command(s, "plain", 0, tmp_path, 10))


def test_commands_parse_with_train_py(study, tmp_path):
    """Every flag is one train.py knows, with the intended value."""
    train = pytest.importorskip("train")
    s = settings(study)
    for config in ("plain", "gr", "zero-warmup-p0.5", "zero-warmup-k4-reuse"):
        command = study.train_command(s, config, 1, tmp_path / config, 10)
        _, data_args, args = train.parse_args(command[2:])
        assert data_args.max_train_samples == 1000 and data_args.max_eval_samples is None
        assert args.warmup_steps == args.gr_warmup_steps == 13 and args.seed == 1
    assert (args.gr_interval, args.gr_reuse, args.gr_warmup_strategy, args.gr_lambda) == (4, True, "zero", 0.1)


def record(config, seed, error, **extra):
    return {
        "config": config, "seed": seed, "final_eval_error": error, "best_eval_error": error - 1,
        "final_eval_error_exact1000": error + 1, "train_loss": 1.0, "eval_loss": 1.5, "train_loss_clean": 0.9,
        "train_error_clean": 30.0, "wall_s": 100.0, "train_runtime": 90.0, "gr_step_fraction": 0.0, "epochs": 10,
        "steps": 100, "warmup_steps": 13, "log_var_warmup": 0.5, "log_var_post_warmup": 0.6,
        "grad_norm_warmup": 2.0, "grad_norm_post_warmup": 1.5, **extra,
    }  # fmt: skip


def test_equal_time_epochs_scale_plain_by_zero_warmups_training_time(study):
    s = settings(study)
    runs = [record("plain", 0, 60, train_runtime=100.0), record("zero-warmup", 0, 61, train_runtime=183.0)]
    assert study.equal_time_epochs(s, runs, 0) == 18  # round(10 × 1.83)
    assert study.equal_time_epochs(s, runs, 1) is None  # seed 1 has not run them


def test_summary_is_mean_and_std_over_seeds_with_paired_differences(study):
    runs = [record("plain", s, e) for s, e in enumerate((60.0, 62.0, 64.0))]
    runs += [record("gr", s, e) for s, e in enumerate((61.0, 64.0, 67.0))]
    summary = study.summarize(runs)
    assert list(summary) == ["plain", "gr"] and summary["gr"]["n"] == 3
    assert summary["plain"]["final_eval_error"] == pytest.approx((62.0, 2.0))
    assert summary["gr"]["final_eval_error"] == pytest.approx((64.0, 3.0))
    assert summary["gr"]["final_eval_error_vs_plain"] == pytest.approx((2.0, 1.0))  # diffs 1, 2, 3
    mean, se, n = study.paired(runs, "gr", "plain")
    assert (mean, n) == (2.0, 3) and se == pytest.approx(1 / math.sqrt(3))
    assert "+2.00 ± 0.58 points (3 seeds; 3.5 standard errors)" in study._diff(runs, "gr", "plain")
    assert study._verdict(runs, "gr", "plain") == "clearly higher"
    assert "| GR | 3 | 64.00 ± 3.00 | 2.00 ± 1.00 |" in study.summary_table(summary)


def test_gr_fractions_weight_each_log_entry_by_its_steps(study):
    history = [
        {"step": 10, "gr_step_fraction": 0.0, "gr_reuse_fraction": 0.0},
        {"step": 40, "gr_step_fraction": 1.0, "gr_reuse_fraction": 0.0},
        {"step": 40, "eval_loss": 1.0},
    ]
    assert study.gr_fractions(history) == {"gr_step_fraction": 0.75, "gr_reuse_fraction": 0.0}


def test_resume_skips_recorded_runs_and_orders_the_equal_time_baseline(study, tmp_path, monkeypatch):
    s = settings(study, seeds=[0, 1])
    results = study.Results(tmp_path / "study-cpu.json", s)
    results.add(record("plain", 0, 60.0))
    results.add(record("gr", 1, 61.0))
    started = []

    def fake_run_one(settings_, results_, runs_dir, config, seed):
        if config == study.EQUAL_TIME:  # its prerequisites are recorded by now
            assert study.equal_time_epochs(settings_, results_.runs, seed) is not None
        started.append((config, seed))
        results_.add(record(config, seed, 60.0))

    monkeypatch.setattr(study, "run_one", fake_run_one)
    assert study.run_study(s, results, tmp_path / "runs", workers=2) == []
    assert ("plain", 0) not in started and ("gr", 1) not in started
    assert len(started) == 2 * len(study.CONFIGS) - 2
    assert started.index(("plain-equal-time", 1)) > started.index(("zero-warmup", 1))
    stored = json.loads((tmp_path / "study-cpu.json").read_text())
    assert len(stored["runs"]) == 2 * len(study.CONFIGS)
    # A second invocation finds nothing to do; one with other settings is refused.
    assert study.pending_runs(s["configs"], s["seeds"], study.Results(tmp_path / "study-cpu.json", s)) == []
    with pytest.raises(SystemExit, match="epochs"):
        study.Results(tmp_path / "study-cpu.json", {**s, "epochs": 20})


def test_a_finished_run_dir_is_recorded_without_training(study, tmp_path, monkeypatch):
    s = settings(study, configs=["plain"], seeds=[0])
    run_dir = tmp_path / "runs" / "plain-seed0"
    write_run(run_dir, "plain", warmup=13, steps=100)
    monkeypatch.setattr(study, "run_training", lambda *a: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(study, "post_eval", lambda *a: {"final_eval_error_exact1000": 55.0})
    results = study.Results(tmp_path / "study-cpu.json", s)
    assert study.run_study(s, results, tmp_path / "runs", workers=2) == []
    (entry,) = results.runs
    assert entry["final_eval_error"] == pytest.approx(58.0) and entry["best_eval_error"] == pytest.approx(58.0)
    assert entry["final_eval_error_exact1000"] == 55.0 and entry["wall_s"] == 12.5 and entry["epochs"] == 10
    assert entry["gr_step_fraction"] == 0.0 and entry["log_var_warmup"] is not None


def write_run(run_dir, config, warmup, steps, gr=False):
    """A fake finished train.py run dir: trainer_state.json with diagnostics and evals, all_results.json."""
    run_dir.mkdir(parents=True)
    history = []
    for step in range(10, steps + 1, 10):
        on = gr and (config == "gr" or step > warmup)
        history.append({
            "step": step, "loss": 2.0 - step / 100, "gr_step_fraction": float(on), "gr_reuse_fraction": 0.0,
            "gr_lambda": 0.1 if on else 0.0, "gr_r": 0.1, "gr_grad_norm": 3.0 - step / 100 - on,
            "adaptive_lr_log_var": 0.5 + step / 1000 + 0.1 * on,
        })  # fmt: skip
        if step % 25 == 0 or step == steps:
            history.append({"step": step, "epoch": step / 10, "eval_error_rate": 0.7 - step / 1000, "eval_loss": 1.8})
    (run_dir / "trainer_state.json").write_text(
        json.dumps({"log_history": history, "global_step": steps, "num_train_epochs": steps // 10})
    )
    results = {"eval_error_rate": 0.58, "eval_loss": 1.7, "train_loss": 1.6, "train_runtime": 12.5}
    (run_dir / "all_results.json").write_text(json.dumps(results))


def test_report_only_writes_the_markdown_and_figure(study, tmp_path):
    runs_dir, docs = tmp_path / "runs", tmp_path / "docs"
    runs = []
    for config in study.CONFIGS:
        for seed in (0, 1, 2):
            run_dir = runs_dir / f"{config}-seed{seed}"
            write_run(run_dir, config, warmup=13, steps=100, gr="plain" not in config)
            error = 60.0 + seed + (3.0 if config == "gr" else 0.0)
            runs.append(record(config, seed, error, run_dir=str(run_dir)))
    docs.mkdir()
    (docs / "study-cpu.json").write_text(json.dumps({"settings": settings(study), "runs": runs}))
    assert study.main(["--report_only", "--docs_dir", str(docs), "--runs_dir", str(runs_dir)]) == 0
    text = (docs / "study-cpu.md").read_text()
    assert "| GR | 3 | 64.00 ± 1.00 | 3.00 ± 0.00 |" in text
    assert "GR − plain = +3.00 ± 0.00 points (3 seeds): clearly higher" in text
    assert "− plain AdamW = +0.00 ± 0.00 points (3 seeds): within noise" in text and "No measurable gain" in text
    assert "## What reproduced and what did not" in text and "adaptive_lr_log_var over the warmup" in text
    assert (docs / "study-cpu.png").stat().st_size > 10_000


def test_report_only_without_results_says_so(study, tmp_path, capsys):
    assert study.main(["--report_only", "--docs_dir", str(tmp_path)]) == 2
    assert "run the study first" in capsys.readouterr().err
