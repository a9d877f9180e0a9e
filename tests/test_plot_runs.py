"""scripts/plot_runs.py on two short real runs, and its error for a directory that is no run."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
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
            out, output_dir=str(out), num_train_epochs=2, warmup_steps=4, gr_warmup_strategy=strategy,
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
    assert runs[0]["warmup_end"] == 4 and runs[1]["warmup_end"] is None  # zero-warmup: λ = 0 through step 4


def test_directory_without_trainer_state_is_a_clear_error(tmp_path, capsys):
    assert _load_script().main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "trainer_state.json" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
