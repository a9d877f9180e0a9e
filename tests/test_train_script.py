"""scripts/train.py end to end, offline on CPU: the quickstart, CIFAR from scratch, Hub ids from a local cache,
push_to_hub intercepted at huggingface_hub, config/CLI precedence, resuming, the clear errors for bad inputs, and
the warnings that are not the user's business kept quiet."""

from __future__ import annotations

import configparser
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import Future
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from huggingface_hub import HfApi, ModelCard, RepoUrl
from PIL import Image as PILImage
from setuptools.config.setupcfg import read_configuration
from sklearn.datasets import load_digits
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, pipeline
from transformers.models.vit import ViTImageProcessorPil

import hf_gr
from hf_gr import GRTrainer, GRTrainingArguments

import image_data as data
import paper_vit as modeling
import train

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train.py"
PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))
# CIFAR-10 in the Hub's parquet layout (train.parquet, test.parquet): HF_GR_CIFAR10, else data/cifar10 in the
# repository, else a `shared/data/cifar10` folder beside it.
_CIFAR_PLACES = (os.environ.get("HF_GR_CIFAR10"), REPO / "data" / "cifar10", REPO.parent / "shared/data/cifar10")
CIFAR = next((Path(p) for p in _CIFAR_PLACES if p and Path(p).is_dir()), REPO / "data" / "cifar10")
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
# A short quickstart: the config file, shortened by flags.
SHORT = ["--num_train_epochs", "4", "--eval_strategy", "no", "--logging_steps", "10"]


def _digit_image() -> PILImage.Image:
    digits = load_digits()
    return PILImage.fromarray(np.clip(digits.images[0] * 16, 0, 255).astype(np.uint8), mode="L")


def _run_script(*argv: str, **env: str) -> subprocess.CompletedProcess:
    """scripts/train.py in a fresh process, offline, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused run prints (warnings from imports aside), after checking it is alone."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# ---- end to end ----


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    metrics = train.main([QUICKSTART, "--output_dir", str(out), *SHORT])

    assert metrics["eval_accuracy"] > 0.3  # chance is 0.1
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "trainer_state.json", "README.md"):
        assert (out / name).is_file(), name
    results = json.loads((out / "all_results.json").read_text())
    assert {"train_loss", "train_runtime", "eval_accuracy", "eval_error_rate"} <= set(results)
    assert results["eval_error_rate"] == pytest.approx(1 - results["eval_accuracy"])

    # Zero-warmup: plain steps (λ = 0) during the LR warmup, then full GR.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    lambdas = [entry["gr_lambda"] for entry in history if "gr_lambda" in entry]
    assert lambdas[0] == 0.0 and lambdas[-1] == 0.1

    card = ModelCard.load(out / "README.md")
    assert {"gradient-regularization", "hf_gr"} <= set(card.data.tags)
    assert card.data.hf_gr["gr_warmup_strategy"] == "zero"
    assert card.data.hf_gr["gr_warmup_steps"] == 10  # ceil(0.1 × 92 steps)
    assert card.data.hf_gr["eval_results"]["accuracy"] == pytest.approx(results["eval_accuracy"])
    assert "trained from scratch on the digits dataset" in card.text and "## Gradient regularization" in card.text

    classifier = pipeline("image-classification", model=str(out))
    predictions = classifier(_digit_image())
    assert predictions[0]["label"] in {str(i) for i in range(10)}

    # The trained folder, evaluated alone (what the refusal of an untrained --model_config eval points to).
    again = train.main([QUICKSTART, "--model_name_or_path", str(out), "--do_train", "false", *SHORT,
                        "--output_dir", str(tmp_path / "eval_only")])  # fmt: skip
    assert again["eval_accuracy"] == pytest.approx(results["eval_accuracy"])

    # ... and with only the data it evaluates: the held-out images as a parquet file, no training data, no config.
    seed = train.parse_args([QUICKSTART, *SHORT, "--output_dir", str(out)])[2].seed
    held_out = tmp_path / "held_out.parquet"
    data.load_digits_dataset(seed=seed)["validation"].to_parquet(str(held_out))
    card_before = (out / "README.md").read_text()
    alone = train.main(["--model_name_or_path", str(out), "--validation_file", str(held_out), "--do_train", "false",
                        "--output_dir", str(tmp_path / "alone"), "--use_cpu", "true", "--report_to", "none"])
    assert alone["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
    assert not (tmp_path / "alone" / "README.md").exists()  # no card claims a training that did not happen
    assert (out / "README.md").read_text() == card_before


def _cifar_subset(path: Path, classes: tuple[int, ...] = (0, 6), per_class: int = 32) -> Path:
    """The first `per_class` CIFAR-10 test images of each of `classes` (airplane, frog), with the file's features."""
    batch = pa.Table.from_batches([next(pq.ParquetFile(CIFAR / "test.parquet").iter_batches(batch_size=1000))])
    labels = np.asarray(batch["label"])
    rows = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    pq.write_table(batch.take(rows), str(path))
    return path


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs CIFAR-10's parquet files: HF_GR_CIFAR10=DIR, or data/cifar10")
def test_from_scratch_vit_on_cifar_parquet(tmp_path):
    """A tiny from-scratch ViT memorizes 64 CIFAR-10 images of two classes; the accuracy it reports is the one
    recomputed independently from the saved model."""
    subset, out = _cifar_subset(tmp_path / "cifar10_airplane_frog.parquet"), tmp_path / "cifar"
    argv = [
        "--model_config", "vit-ti", "--config_overrides", TINY,
        "--train_file", str(subset), "--validation_file", str(subset), "--augmentation", "none",
        "--max_steps", "40", "--warmup_steps", "2", "--learning_rate", "0.01", "--per_device_train_batch_size", "32",
        "--save_strategy", "no", "--logging_steps", "1", "--use_cpu", "true", "--output_dir", str(out),
    ]  # fmt: skip
    metrics = train.main(argv)

    assert metrics["eval_accuracy"] > 0.75  # chance is 0.5
    # Recomputed from the file's rows, decoded straight from their PNG bytes, the saved processor and model.
    table = pq.read_table(subset).to_pydict()
    images = [PILImage.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in table["img"]]
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = ViTImageProcessorPil.from_pretrained(out)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predictions = model(pixel_values=pixels).logits.argmax(-1).numpy()
    assert metrics["eval_accuracy"] == pytest.approx(float(np.mean(predictions == np.asarray(table["label"]))))

    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], config["patch_size"], config["hidden_size"]) == (32, 4, 32)
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.1
    assert config["id2label"]["0"] == "airplane" and config["id2label"]["6"] == "frog"
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32}
    assert processor["image_mean"] == data.CHANNEL_STATS["cifar10"][0]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["gr_lambda"] for e in history if "gr_lambda" in e] == [0.0, 0.0] + [0.1] * 38


def _cache_tiny_vit(cache: Path, repo_id: str) -> None:
    """Write a tiny ViT (3 classes, 16×16) into a huggingface_hub cache layout, as a download would."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(snapshot)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        snapshot
    )
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)


@pytest.mark.slow  # a subprocess: the script's own command line
def test_hub_id_resolved_offline_from_cache(tmp_path):
    cache, out = tmp_path / "hub", tmp_path / "finetuned"
    _cache_tiny_vit(cache, "hf-gr-test/tiny-vit")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    argv = [
        "--model_name_or_path", "hf-gr-test/tiny-vit", "--dataset_name", "digits", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--max_steps", "2", "--per_device_train_batch_size", "16",
        "--save_strategy", "no", "--use_cpu", "true", "--output_dir", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *argv], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_labels" not in result.stderr, result.stderr[-3000:]  # the new head's size follows id2label, silently

    config = json.loads((out / "config.json").read_text())
    assert len(config["id2label"]) == 10  # a new 10-class head replaced the cached 3-class one
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 16, "width": 16} and processor["image_mean"] == [0.5] * 3
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "hf-gr-test/tiny-vit"
    assert card.data.hf_gr["base_model"] == "hf-gr-test/tiny-vit"


def test_push_to_hub_uploads_weights_and_gr_card(tmp_path, monkeypatch):
    uploads: list[Path] = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, run_as_future=False, **kwargs):
        assert repo_id == "user/gr-digits"
        target = tmp_path / f"upload{len(uploads)}"
        shutil.copytree(folder_path, target, ignore=shutil.ignore_patterns("_*", "checkpoint-*"))
        uploads.append(target)
        if run_as_future:
            future: Future = Future()
            future.set_result(None)
            return future
        return None

    def no_network(self, *args, **kwargs):
        raise AssertionError("unexpected Hub call")

    monkeypatch.setattr(train, "is_offline_mode", lambda: False)  # online, with the Hub intercepted
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, **kwargs: {"name": "user"})
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    for name in ("create_commit", "upload_file", "preupload_lfs_files", "model_info"):
        monkeypatch.setattr(HfApi, name, no_network)

    out = tmp_path / "out"
    argv = [QUICKSTART, *SHORT, "--num_train_epochs", "1", "--output_dir", str(out)]
    train.main([*argv, "--push_to_hub", "true", "--hub_model_id", "user/gr-digits"])

    assert uploads, "nothing was uploaded"
    uploaded = uploads[-1]
    assert (uploaded / "model.safetensors").is_file() and (uploaded / "preprocessor_config.json").is_file()
    card = ModelCard.load(uploaded / "README.md")
    assert {"gradient-regularization", "hf_gr"} <= set(card.data.tags)
    gr = card.data.hf_gr
    assert (gr["gr_lambda"], gr["gr_r"], gr["gr_warmup_strategy"], gr["gr_method"]) == (
        0.1, 0.1, "zero", "finite_difference"
    )  # fmt: skip
    assert gr["dataset"] == "digits" and "accuracy" in gr["eval_results"]
    model = AutoModelForImageClassification.from_pretrained(uploaded)
    assert model.config.num_labels == 10
    assert pipeline("image-classification", model=str(uploaded))(_digit_image())


# ---- configuration ----


def test_config_file_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset_name: digits\nmodel_config: vit-s\nlearning_rate: 0.01\ngr_lambda: 0.2\nseed: 3\n")
    model_args, data_args, args = train.parse_args([str(config), "--gr_lambda", "0.05", "--seed", "7"])
    assert (args.gr_lambda, args.seed) == (0.05, 7)  # flags win
    assert (args.learning_rate, model_args.model_config, data_args.dataset_name) == (0.01, "vit-s", "digits")

    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"dataset_name": "digits", "model_config": "vit-b", "gr_warmup_strategy": "r"}))
    model_args, _, args = train.parse_args([str(as_json), "--gr_warmup_strategy", "lambda"])
    assert (model_args.model_config, args.gr_warmup_strategy) == ("vit-b", "lambda")


def test_a_flag_replaces_the_config_files_data_and_model_source(tmp_path):
    paper = str(REPO / "configs" / "paper" / "vit-ti_cifar10_adam.yaml")  # dataset_name + model_config
    model_args, data_args, _ = train.parse_args([paper, "--train_file", "cifar10/train.parquet"])
    assert (data_args.dataset_name, data_args.train_file, model_args.model_config) == (
        None, "cifar10/train.parquet", "vit-ti"
    )  # fmt: skip
    model_args, _, _ = train.parse_args([paper, "--model_name_or_path", "google/vit-base-patch16-224-in21k"])
    assert (model_args.model_config, model_args.config_overrides) == (None, None)

    files = tmp_path / "files.yaml"
    files.write_text("train_file: a.parquet\nvalidation_file: b.parquet\nmodel_name_or_path: x/y\n")
    model_args, data_args, _ = train.parse_args([str(files), "--dataset_name=digits", "--model_config", "vit-s"])
    assert (data_args.dataset_name, data_args.train_file, data_args.validation_file) == ("digits", None, None)
    assert (model_args.model_config, model_args.model_name_or_path) == ("vit-s", None)


def test_conflicting_sources_say_which_came_from_the_config_file(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("dataset_name: digits\ntrain_file: a.parquet\nmodel_config: vit-ti\n")
    in_file = r"--dataset_name 'digits' \(config file .*both\.yaml\) and --train_file 'a\.parquet' \(config file"
    with pytest.raises(ValueError, match=in_file):
        train.parse_args([str(both)])
    flags = ["--dataset_name", "digits", "--train_file", "a.parquet", "--model_config", "vit-ti"]
    with pytest.raises(ValueError, match=r"'digits' \(command line\) and --train_file 'a\.parquet' \(command line\)"):
        train.parse_args(flags)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs(path):
    model_args, data_args, args = train.parse_args([str(path), "--gr_warmup_strategy", "lambda"])
    name, dataset, optimizer = path.stem.split("_")
    assert model_args.model_config == name and data_args.dataset_name == f"uoft-cs/{dataset}"
    assert args.gr_warmup_strategy == "lambda"
    assert (args.learning_rate, args.weight_decay, args.per_device_train_batch_size) == (1e-3, 0.3, 256)
    assert args.num_train_epochs == 300 and round(args.warmup_steps * 300) == 40
    assert args.lr_scheduler_type == "cosine" and args.max_grad_norm == 5.0
    override = train.optimizer_override(model_args, args)
    if optimizer == "rmsprop":
        assert override[0] is modeling.DecoupledRMSprop and override[1]["alpha"] == 0.9
    else:
        assert override is None and args.optim == "adamw_torch"


def test_paper_configs_need_only_the_recipe_extra_and_fit_2_cpus(monkeypatch):
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    recipe = setup["options.extras_require"]["recipe"].split()
    installed = {requirement.split(">")[0].split("=")[0] for requirement in recipe}
    for config in PAPER_CONFIGS:
        _, _, args = train.parse_args([str(config)])
        assert set(args.report_to) <= installed | {"none"}, config.name  # pip install .[recipe] brings the logger

        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # a 2-CPU machine
        train.cap_dataloader_workers(args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DataLoader(range(4), num_workers=args.dataloader_num_workers).check_worker_number_rationality()
        assert not caught, [str(w.message) for w in caught]


def test_paper_vit_sizes_and_zero_head():
    for name, (width, depth, heads, mlp) in {
        "vit-ti": (192, 12, 3, 768), "vit-s": (384, 12, 6, 1536), "vit-b": (768, 12, 12, 3072)
    }.items():  # fmt: skip
        config = modeling.paper_vit_config(name, {0: "a", 1: "b"})
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (width, depth, heads)
        assert (config.intermediate_size, config.image_size, config.patch_size) == (mlp, 32, 4)
    model = modeling.paper_vit(modeling.paper_vit_config("vit-ti", {0: "a", 1: "b"}, TINY))
    assert not model.classifier.weight.any() and not model.classifier.bias.any()
    assert model.vit.embeddings.position_embeddings.shape[1] == 65  # 64 patches + CLS


def test_decoupled_rmsprop_decays_weights_directly():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = modeling.DecoupledRMSprop([param], lr=0.1, weight_decay=0.5, alpha=0.9, eps=1e-8)
    param.grad = torch.zeros(3)  # no gradient step: only the decay moves θ
    optimizer.step()
    assert torch.allclose(param.detach(), torch.full((3,), 0.95))


def test_augmentation_crops_windows_of_the_reflect_padded_image():
    torch.manual_seed(0)
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = data.Augmentation(flip=False, padding=1)(images)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    windows = [padded[:, :, i : i + 8, j : j + 8] for i in range(3) for j in range(3)]
    for n in range(2):
        assert any(torch.equal(out[n], w[n]) for w in windows)
    flipped = data.Augmentation(flip=True, padding=0)(images)
    for n in range(2):
        assert torch.equal(flipped[n], images[n]) or torch.equal(flipped[n], images[n].flip(-1))


# ---- bad inputs: a clear error before any training ----


def _write_parquet(path: Path, labels: list) -> str:
    features = Features({"image": Image(), "label": Value("int64")})
    images = [PILImage.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)) for i in range(len(labels))]
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return str(path)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the script gets as far as building the trainer."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("the trainer was built despite a bad input")

    monkeypatch.setattr(GRTrainer, "__init__", refuse)


def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("dataset_name: digits\nmodel_config: vit-ti\nlearning_rte: 0.1\n")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet")
    train_file = _write_parquet(tmp_path / "train.parquet", [0, 1, 0, 1])
    eval_file = _write_parquet(tmp_path / "eval.parquet", [0, 5])
    scratch = ["--model_config", "vit-ti", "--config_overrides", TINY]
    return {
        "unknown config key": ([str(unknown)], "learning_rte"),
        "unknown flag": (["--dataset_name", "digits", *scratch, "--gr_lamda", "1"], "--gr_lamda"),
        "missing image column": (["--dataset_name", "digits", *scratch, "--image_column", "pixels"], "'pixels'"),
        "missing label column": (["--dataset_name", "digits", *scratch, "--label_column", "y"], "'y'"),
        "unreadable file": (["--train_file", str(garbage), *scratch], "Could not read --train_file"),
        "missing file": (["--train_file", str(tmp_path / "nope.parquet"), *scratch], "does not exist"),
        "label outside classes": (
            ["--train_file", train_file, "--validation_file", eval_file, *scratch],
            r"Label\(s\) \[5\].*'validation'",
        ),
        "unknown override": (
            ["--dataset_name", "digits", "--model_config", "vit-ti", "--config_overrides", "depth=2"],
            "no field 'depth'",
        ),  # fmt: skip
        "two models": (["--dataset_name", "digits", *scratch, "--model_name_or_path", "x/y"], "exactly one"),
        "no model": (["--dataset_name", "digits"], "exactly one"),
        "evaluate untrained": (["--dataset_name", "digits", *scratch, "--do_train", "false"], "untrained"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown config key", "unknown flag", "missing image column", "missing label column", "unreadable file",
        "missing file", "label outside classes", "unknown override", "two models", "no model", "evaluate untrained",
    ],
)  # fmt: skip
def test_bad_input_fails_clearly_before_training(case, tmp_path, no_training):
    argv, message = _bad_cases(tmp_path)[case]
    with pytest.raises(ValueError, match=message):
        train.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_parser_errors_raise_instead_of_exiting(tmp_path):
    with pytest.raises(ValueError, match="invalid choice: 'vit-x'"):
        train.main(["--dataset_name", "digits", "--model_config", "vit-x", "--output_dir", str(tmp_path / "out")])


@pytest.mark.slow  # a subprocess: the script's own command line
def test_argument_error_prints_one_line_and_exits_2(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("dataset_name: digits\nmodel_config: vit-ti\nlearning_rte: 0.1\n")
    line = _error_line(_run_script(str(config), "--output_dir", str(tmp_path / "out")))
    assert "learning_rte" in line and str(config) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a subprocess: the script's own command line
def test_unknown_model_offline_is_named_as_not_cached(tmp_path):
    argv = ["--model_name_or_path", "hf-gr-test/no-such-vit", "--dataset_name", "digits"]
    line = _error_line(_run_script(*argv, "--output_dir", str(tmp_path / "o"), HF_HUB_CACHE=str(tmp_path / "empty")))
    assert "'hf-gr-test/no-such-vit' is not in the local cache" in line


def test_help_shows_the_config_file_and_lists_model_data_and_gr_options_first(capsys):
    with pytest.raises(SystemExit) as exited:
        train.parse_args(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith(" [config.yaml|config.json] [--flag value ...]")
    titles = ("model", "data", "gradient regularization (GR)", "training (transformers.TrainingArguments)")
    starts = [text.index(f"\n{title}:\n") for title in titles]
    assert starts == sorted(starts)
    model, data_, gr, trainer = (text[a:b] for a, b in zip(starts, [*starts[1:], len(text)]))
    assert "--model_name_or_path" in model and "--train_file" in data_ and "--learning_rate" in trainer
    gr_flags = [f"--{f.name} " for f in fields(GRTrainingArguments) if f.init and f.name.startswith("gr_")]
    assert gr_flags and all(flag in gr for flag in gr_flags) and "--gr_" not in trainer
    assert "--learning_rate" not in text[: starts[-1]]


def test_a_resumed_run_says_where_it_picks_up_before_loading_anything(tmp_path, caplog):
    out = tmp_path / "run"
    argv = [QUICKSTART, *SHORT, "--do_eval", "false", "--save_strategy", "steps", "--save_steps", "2"]
    train.main([*argv, "--max_steps", "2", "--output_dir", str(out)])
    caplog.clear()
    metrics = train.main([*argv, "--max_steps", "4", "--output_dir", str(out)])  # the default log level: no flag
    messages = [record.getMessage() for record in caplog.records]
    said = f"Resuming from checkpoint-2 (step 2) in {out}; to start over, remove {out} or pass another --output_dir"
    assert said in messages
    assert messages.index(said) < next(i for i, m in enumerate(messages) if "train /" in m)  # before the data
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4 and metrics["train_loss"] > 0


@pytest.mark.parametrize("last_checkpoint", ["at the last step", "removed"])
def test_a_finished_run_is_not_trained_again(last_checkpoint, tmp_path, caplog):
    """Rerunning a finished run keeps its results (it used to write train_loss 0.0 over them or, when its last
    checkpoint is gone, retrain the steps after the one left) and says how to train longer or start over."""
    out = tmp_path / "run"
    every_2 = ["--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)]
    argv = [QUICKSTART, *SHORT, "--max_steps", "4", *every_2]
    first = train.main(argv)
    if last_checkpoint == "removed":  # by hand, or by --save_total_limit: the run's final state is in out/ itself
        shutil.rmtree(out / "checkpoint-4")
    saved = {name: (out / name).read_text() for name in ("train_results.json", "all_results.json", "README.md")}
    weights = (out / "model.safetensors").read_bytes()
    caplog.clear()

    again = train.main(argv)
    assert again == first and first["train_loss"] > 0
    assert {name: (out / name).read_text() for name in saved} == saved
    assert (out / "model.safetensors").read_bytes() == weights
    assert f"The run in {out} is complete (step 4 of 4): nothing to train" in caplog.text
    assert "raise --num_train_epochs or --max_steps" in caplog.text

    longer = train.main([QUICKSTART, *SHORT, "--max_steps", "6", *every_2])  # more steps: training goes on
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6 and longer["train_loss"] > 0


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail the test if the script gets as far as loading data."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded despite a bad argument")

    monkeypatch.setattr(data, "load_image_dataset", refuse)


@pytest.mark.parametrize("given", ["missing", "file", "not a checkpoint"])
def test_resume_from_a_missing_checkpoint_is_refused_before_loading(given, tmp_path, nothing_loaded):
    path = tmp_path / "checkpoint-7"
    if given == "file":
        path.write_text("")
    elif given == "not a checkpoint":
        path.mkdir()
    expected = {
        "missing": "does not exist", "file": "is a file",
        "not a checkpoint": r"is not a checkpoint \(it has no trainer_state.json\)",
    }  # fmt: skip
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint '{path}' {expected[given]}"):
        train.main([QUICKSTART, "--resume_from_checkpoint", str(path), "--output_dir", str(tmp_path / "out")])


@pytest.mark.slow  # a subprocess: the script's own command line
def test_resume_from_a_missing_checkpoint_prints_one_line(tmp_path):
    line = _error_line(_run_script(QUICKSTART, "--resume_from_checkpoint", str(tmp_path / "nope"),
                                   "--output_dir", str(tmp_path / "out")))  # fmt: skip
    assert f"--resume_from_checkpoint '{tmp_path / 'nope'}' does not exist" in line


def test_fast_path_equals_the_image_processor():
    processor = ViTImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=[0.49, 0.48, 0.45], image_std=[0.25] * 3
    )
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    transform = data.ImageTransform(processor, "image", "label")
    expected = processor(images, return_tensors="pt")["pixel_values"]
    got = torch.stack(transform({"image": images, "label": [0, 1, 2, 3]})["pixel_values"])
    assert torch.allclose(got, expected, atol=1e-5)
    resized = transform({"image": [PILImage.new("RGB", (8, 8))], "label": [0]})["pixel_values"][0]  # processor path
    assert resized.shape == (3, 32, 32)


def test_trains_and_evaluates_by_default_even_with_an_eval_strategy():
    _, _, args = train.parse_args(["--dataset_name", "digits", "--model_config", "vit-ti", "--eval_strategy", "epoch"])
    assert args.do_train and args.do_eval
    _, _, args = train.parse_args(["--dataset_name", "digits", "--model_name_or_path", "x/y", "--do_train", "false"])
    assert not args.do_train and args.do_eval


def test_same_seed_same_run(tmp_path):
    """Runs that differ only in their output directory train identically (the model init follows the seed)."""
    argv = [QUICKSTART, *SHORT, "--max_steps", "3", "--do_eval", "false"]
    losses = [train.main([*argv, "--output_dir", str(tmp_path / f"run{i}")])["train_loss"] for i in range(2)]
    assert losses[0] == losses[1]


# ---- --push_to_hub without the Hub: one line before anything is loaded, naming the local alternative ----


@pytest.mark.slow  # a subprocess: the script's own command line
def test_push_to_hub_offline_is_one_line_naming_the_local_alternative(tmp_path):
    out = tmp_path / "out"
    line = _error_line(_run_script(QUICKSTART, "--push_to_hub", "true", "--hub_model_id", "me/gr", "--output_dir",
                                   str(out)))  # fmt: skip
    assert "--push_to_hub needs the Hub, but HF_HUB_OFFLINE=1" in line
    assert f"saved in {out} only; upload it later with `hf upload me/gr {out}`" in line
    assert not out.exists()


@pytest.mark.slow  # a subprocess: the script's own command line
def test_push_to_hub_with_the_hub_out_of_reach_is_one_line(tmp_path):
    home = tmp_path / "home"  # no saved token
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(home)}
    argv = [QUICKSTART, "--push_to_hub", "true", "--output_dir", str(tmp_path / "out")]
    assert "--push_to_hub needs a Hub token: log in with `hf auth login`" in _error_line(_run_script(*argv, **env))
    line = _error_line(_run_script(*argv, **env, HF_TOKEN="hf_not_a_real_token"))
    assert "--push_to_hub: the Hub cannot be reached (ConnectError" in line and "`hf upload USER/REPO" in line
    assert not (tmp_path / "out").exists()


def test_push_to_hub_is_checked_before_loading(tmp_path, nothing_loaded, monkeypatch):
    monkeypatch.setattr(train, "is_offline_mode", lambda: True)  # as under HF_HUB_OFFLINE=1, whatever the caller set
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        train.main([QUICKSTART, "--push_to_hub", "true", "--output_dir", str(tmp_path / "out")])


# ---- messages ----


@pytest.mark.slow  # a subprocess: the script's own command line
def test_a_misspelled_flag_or_key_gets_did_you_mean(tmp_path):
    argv = [QUICKSTART, "--gr_lamda", "0.5", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"\['--gr_lamda', '0\.5'\]; did you mean --gr_lambda \(not --gr_lamda\)\?"):
        train.main(argv)
    with pytest.raises(ValueError, match=r"mean --per_device_train_batch_size \(not --per_device_train_batch_sise\)"):
        train.parse_args([QUICKSTART, "--per_device_train_batch_sise=8"])
    config = tmp_path / "typo.yaml"
    config.write_text("dataset_name: digits\nmodel_config: vit-ti\nlearning_rte: 0.1\n")
    line = _error_line(_run_script(str(config), "--output_dir", str(tmp_path / "out")))
    assert "Unknown key(s) in" in line and "learning_rte (did you mean learning_rate?)" in line


def test_a_no_flag_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    negative = text.split("--no_ignore_mismatched_sizes, --no-ignore-mismatched-sizes ", 1)[1]
    assert negative.startswith("Set --ignore_mismatched_sizes to false.")
    assert "(--no_ignore_mismatched_sizes: stop with an error instead)" in text
    model_args, _, _ = train.parse_args(["--dataset_name", "digits", "--model_name_or_path", "x/y",
                                         "--no_ignore_mismatched_sizes"])  # fmt: skip
    assert model_args.ignore_mismatched_sizes is False


def test_one_version():
    """setup.cfg reads the package's version, so the two cannot disagree."""
    version = read_configuration(REPO / "setup.cfg")["metadata"]["version"]
    assert version == hf_gr.__version__ == "0.2.0"


# ---- warnings that are not the user's business ----


def test_no_pin_memory_warning_without_an_accelerator(tmp_path):
    assert not torch.accelerator.is_available()  # the situation this test is about: a CPU-only machine
    argv = [QUICKSTART, *SHORT, "--max_steps", "1", "--use_cpu", "false", "--output_dir", str(tmp_path / "out")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(argv)
    assert not [str(w.message) for w in caught if "pin_memory" in str(w.message)]


def test_ddp_skips_the_unused_parameter_search_for_the_recipes_vits(tmp_path):
    """The search is off for a ViT classifier, which uses every parameter in each forward pass (checked here with
    a backward pass); an explicit flag and other models keep the Trainer's choice."""
    model = modeling.paper_vit(modeling.paper_vit_config("vit-ti", {0: "a", 1: "b"}, TINY))
    pixels, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    model.classifier.weight.data.normal_()  # a zero head would leave the encoder without gradient
    model(pixel_values=pixels, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    def args(*flags: str) -> GRTrainingArguments:
        return train.parse_args(["--dataset_name", "digits", "--model_config", "vit-ti", "--use_cpu", "true",
                                 "--output_dir", str(tmp_path), *flags])[2]  # fmt: skip

    quiet = args()
    train.quiet_defaults(quiet, model)
    assert quiet.ddp_find_unused_parameters is False and quiet.dataloader_pin_memory is False
    kept = args("--ddp_find_unused_parameters", "true")
    train.quiet_defaults(kept, model)
    assert kept.ddp_find_unused_parameters is True
    other = args()
    train.quiet_defaults(other, torch.nn.Linear(2, 2))
    assert other.ddp_find_unused_parameters is None


# ---- an unreadable image: one line naming the file ----


@pytest.mark.slow  # a subprocess: the script's own command line
def test_an_unreadable_image_prints_one_line_naming_it(tmp_path):
    folder = tmp_path / "images"
    for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            PILImage.new("RGB", (8, 8), colour).save(folder / name / f"{i}.png")
    (folder / "red" / "1.png").write_bytes((folder / "red" / "0.png").read_bytes()[:30])  # truncated
    line = _error_line(_run_script(QUICKSTART, "--train_file", str(folder), "--output_dir", str(tmp_path / "out")))
    assert line.startswith(f"error: Cannot read the image '{folder / 'red' / '1.png'}' in the 'train' split")
    assert line.endswith("or pass --skip_bad_images to drop unreadable images.")


def test_an_error_raised_in_a_data_loader_worker_is_still_one_line():
    try:
        raise data.InputError("Cannot read the image 'a.png' in the 'train' split: OSError: truncated.")
    except data.InputError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what a worker sends back
    with pytest.raises(data.InputError) as raised:
        wrapped.reraise()
    assert "Traceback" in str(raised.value)
    expected = "error: Cannot read the image 'a.png' in the 'train' split: OSError: truncated."
    assert train.error_line(raised.value) == expected


@pytest.mark.parametrize("load, omp, want", [(0.0, None, 2), (2.1, None, 1), (1.0, None, 1), (0.1, "2", None)])
def test_cpu_threads_are_the_cores_other_processes_leave_idle(monkeypatch, load, omp, want):
    """Two cores: idle → 2 threads; two busy processes beside the run → 1 (not 2 fighting them); one → 1;
    OMP_NUM_THREADS set → left alone."""
    args = train.parse_args([QUICKSTART, "--output_dir", "unused", "--use_cpu", "true"])[2]
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(train.os, "getloadavg", lambda: (load, load, load))
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    try:
        assert train.cpu_threads(args) == want
        assert torch.get_num_threads() == (want or before)
    finally:
        torch.set_num_threads(before)


def test_a_card_names_local_data_after_its_folder_not_its_split():
    assert train.dataset_label("data/cifar10/train.parquet") == "cifar10"
    assert train.dataset_label("/data/pets/train/") == "pets"
    assert train.dataset_label("flowers.parquet") == "flowers"
    assert train.dataset_label("train") == "train"  # nothing better to say
    assert train.dataset_label(None) is None
