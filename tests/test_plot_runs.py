"""scripts/plot_runs.py on two short real runs: the whole GR warmup shaded, panels without data labelled, the
default output beside the runs, and one-line errors for a directory that is no run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from hf_gr import GRTrainer

from gr_testing import DictDataset, TinyNet, make_args

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_runs.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("plot_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    dirs = []
    for name, strategy in (("zero", "zero"), ("plain", "none")):
        out = tmp_path_factory.mktemp(name)
        args = make_args(
            out, output_dir=str(out), num_train_epochs=2, warmup_steps=5, gr_warmup_strategy=strategy,
            gr_lambda=0.1 if name != "plain" else 0.0, gr_diagnostics_steps=2, eval_strategy="epoch",
            optim="adamw_torch", logging_steps=2,
        )  # fmt: skip
        trainer = GRTrainer(
            model=TinyNet(), args=args, train_dataset=DictDataset(64), eval_dataset=DictDataset(32, seed=1),
            compute_metrics=_accuracy,
        )  # fmt: skip
        trainer.train()
        trainer.save_state()
        trainer.create_model_card()
        dirs.append(str(out))
    return dirs


def test_plot_writes_png(tmp_path, two_runs):
    plot_runs = _load_script()
    out = tmp_path / "fig.png"
    assert plot_runs.main([*two_runs, "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1760, 495)
        assert np.asarray(image.convert("L")).std() > 5  # something was drawn
    runs = [plot_runs.read_run(d) for d in two_runs]
    assert runs[0]["label"].startswith("GR, zero-warmup") and runs[1]["label"].startswith("plain")
    assert runs[1]["warmup_end"] is None  # plain training: nothing to shade


def test_the_whole_gr_warmup_is_shaded(two_runs):
    plot_runs = _load_script()
    runs = [plot_runs.read_run(d) for d in two_runs]
    assert runs[0]["warmup_end"] == 5  # W = 5 from the card; the last logged step inside the warmup is 4
    fig = plot_runs.figure(runs)
    for ax, end in zip(fig.axes, (5 / 8, 5, 5)):  # eval error vs epoch (8 steps per epoch), then vs step
        (span,) = ax.patches
        assert (span.get_x(), span.get_x() + span.get_width()) == pytest.approx((0, end))


def test_a_panel_without_data_says_how_to_get_it(tmp_path, monkeypatch):
    run = tmp_path / "no-diagnostics"
    run.mkdir()
    history = [{"step": 8, "epoch": 1.0, "loss": 1.0, "gr_lambda": 0.1, "gr_r": 0.1}, {"step": 8, "epoch": 1.0,
               "eval_accuracy": 0.5}]  # fmt: skip
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    assert _load_script().main([str(run), "--out", str(tmp_path / "fig.png")]) == 0
    texts = [" ".join(text.get_text() for text in ax.texts) for ax in figures[0].axes]
    assert "run with --gr_diagnostics_steps N" in texts[1] and "run with --gr_diagnostics_steps N" in texts[2]
    assert texts[0] == ""  # the eval panel has its data


def test_default_output_goes_beside_the_first_run_not_into_the_working_directory(tmp_path, two_runs, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert _load_script().main(two_runs) == 0
    assert (Path(two_runs[0]).parent / "runs.png").is_file()
    assert not list(cwd.iterdir())


def test_directory_without_trainer_state_is_a_clear_error(tmp_path, capsys):
    assert _load_script().main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "trainer_state.json" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_command_line_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{not json")
    for argv in ([str(tmp_path)], []):  # a corrupt trainer_state.json; no run directory at all
        result = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert ("trainer_state.json" if argv else "run_dirs") in lines[0]


def test_the_third_panel_is_the_adaptive_lr_log_variance(two_runs):
    plot_runs = _load_script()
    runs = [plot_runs.read_run(d) for d in two_runs]
    fig = plot_runs.figure(runs)
    (line, _) = fig.axes[2].get_lines()
    logged = [e["adaptive_lr_log_var"] for e in runs[0]["history"] if "adaptive_lr_log_var" in e]
    assert list(line.get_ydata()) == pytest.approx(logged) and logged
    assert "log-variance" in fig.axes[2].get_title()
