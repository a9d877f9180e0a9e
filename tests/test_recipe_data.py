"""scripts/image_data.py on small local datasets: image-folder classes matched by name across splits, and image
columns that are stored but not decoded (or are no images at all)."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from hf_gr import GRTrainer

import image_data as data
import train

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0), "purple": (128, 0, 128)}
# A one-layer ViT on 8×8 images (4 patches + CLS): seconds to train on solid colours.
TINY_8X8 = [
    "--model_config", "vit-ti", "--config_overrides",
    "image_size=8,patch_size=4,hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64",
]  # fmt: skip


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the script gets as far as building the trainer."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("the trainer was built despite a bad input")

    monkeypatch.setattr(GRTrainer, "__init__", refuse)


def _image_folder(root: Path, classes: list[str], per_class: int = 4) -> str:
    """One sub-folder of solid-colour 8×8 PNGs per class."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            PILImage.new("RGB", (8, 8), COLOURS[name]).save(root / name / f"{i}.png")
    return str(root)


def _colour_name(image: PILImage.Image) -> str:
    pixel = image.convert("RGB").getpixel((0, 0))
    return next(name for name, colour in COLOURS.items() if colour == pixel)


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _struct_parquet(path: Path, n: int = 16) -> str:
    """Images stored as {bytes, path} structs by plain pyarrow: no `datasets` Image feature in the metadata."""
    labels = [i % 2 for i in range(n)]
    images = [{"bytes": _png(COLOURS["red"] if y else COLOURS["blue"]), "path": None} for y in labels]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(images, type=struct), "label": labels}), str(path))
    return str(path)


# ---- image folders: validation classes matched to the training classes by name ----


def test_validation_folder_classes_are_matched_by_name(tmp_path):
    train_dir = _image_folder(tmp_path / "train", ["blue", "green", "red"])
    eval_dir = _image_folder(tmp_path / "eval", ["blue", "red"])  # no green: its own ClassLabel is [blue, red]
    raw = data.load_image_dataset(train_file=train_dir, validation_file=eval_dir)
    raw, names = data.prepare_labels(raw, "label")

    assert names == ["blue", "green", "red"]
    assert raw["validation"].features["label"].names == names
    for row in raw["validation"]:
        assert names[row["label"]] == _colour_name(row["image"])
    for row in raw["train"]:
        assert names[row["label"]] == _colour_name(row["image"])


def test_trivially_separable_folders_score_perfectly(tmp_path):
    """The symptom: a 3-class run scored 0.50 (red counted as green) where the model was right on every image."""
    train_dir = _image_folder(tmp_path / "train", ["blue", "green", "red"], per_class=8)
    eval_dir = _image_folder(tmp_path / "eval", ["blue", "red"])
    argv = [
        "--train_file", train_dir, "--validation_file", eval_dir, *TINY_8X8, "--augmentation", "none",
        "--max_steps", "30", "--learning_rate", "0.01", "--warmup_steps", "0", "--per_device_train_batch_size", "8",
        "--gr_lambda", "0", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert train.main(argv)["eval_accuracy"] == 1.0


def test_validation_class_unknown_to_training_stops_the_run(tmp_path, no_training):
    train_dir = _image_folder(tmp_path / "train", ["blue", "green", "red"])
    eval_dir = _image_folder(tmp_path / "eval", ["blue", "purple"])
    argv = ["--train_file", train_dir, "--validation_file", eval_dir, *TINY_8X8, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"'purple'.*'validation'"):
        train.main(argv)


# ---- image columns: stored structs are decoded, other types refused ----


def test_undecoded_image_structs_are_decoded(tmp_path):
    path = _struct_parquet(tmp_path / "structs.parquet")
    argv = [
        "--train_file", path, "--validation_file", path, *TINY_8X8, "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    metrics = train.main(argv)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["train_loss"] > 0

    raw = data.load_image_dataset(train_file=path)
    decoded = data.decode_images(raw, "image")
    assert isinstance(decoded["train"][0]["image"], PILImage.Image)


def test_image_column_that_holds_no_images_is_refused(tmp_path, no_training):
    path = _struct_parquet(tmp_path / "structs.parquet")
    argv = ["--train_file", path, "--image_column", "label", *TINY_8X8, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"--image_column 'label'.*int64"):
        train.main(argv)
