"""scripts/image_data.py on small local datasets: image-folder classes matched by name across splits, image columns
that are stored but not decoded (or are no images at all), unreadable images, and the evaluation split."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
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


# ---- unreadable images: named before training, or dropped with --skip_bad_images ----


def _spoil(folder: str, *names: str) -> list[str]:
    """Truncate the first PNG named and overwrite the others with text: images PIL cannot read."""
    paths = [str(Path(folder) / name) for name in names]
    whole = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(whole[: len(whole) // 2])
    for path in paths[1:]:
        Path(path).write_text("not an image")
    return paths


def _short_run(train_dir: str, eval_dir: str, out: Path, *flags: str) -> list[str]:
    return [
        "--train_file", train_dir, "--validation_file", eval_dir, *TINY_8X8, "--augmentation", "none",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "true", "--output_dir", str(out), *flags,
    ]  # fmt: skip


def test_an_unreadable_image_is_named_before_training(tmp_path, no_training):
    train_dir = _image_folder(tmp_path / "train", ["blue", "red"])
    truncated, text = _spoil(train_dir, "red/1.png", "blue/2.png")
    eval_dir = _image_folder(tmp_path / "eval", ["blue", "red"])
    with pytest.raises(ValueError) as raised:
        train.main(_short_run(train_dir, eval_dir, tmp_path / "out"))
    message = str(raised.value)
    assert repr(text) in message or repr(truncated) in message  # the first of the two in the split's order
    assert "2 unreadable images" in message and "--skip_bad_images" in message and "'train' split" in message


def test_an_unreadable_parquet_image_is_named_by_its_row(tmp_path, no_training):
    path = _struct_parquet(tmp_path / "structs.parquet")
    table = pq.read_table(path).to_pydict()
    table["image"][5] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(table["image"], type=struct), "label": table["label"]}), path)
    clean = _struct_parquet(tmp_path / "clean.parquet")
    with pytest.raises(ValueError, match=r"Cannot read the image in row 5 of the 'train' split: UnidentifiedImage"):
        train.main(_short_run(path, clean, tmp_path / "out"))


def test_skip_bad_images_drops_them_with_a_count(tmp_path, caplog):
    train_dir = _image_folder(tmp_path / "train", ["blue", "red"])
    _spoil(train_dir, "red/1.png", "blue/2.png")
    eval_dir = _image_folder(tmp_path / "eval", ["blue", "red"])
    _spoil(eval_dir, "blue/0.png")
    caplog.set_level("INFO")
    metrics = train.main(_short_run(train_dir, eval_dir, tmp_path / "out", "--skip_bad_images"))

    assert "Dropped 2 unreadable image(s) from the 'train' split (--skip_bad_images), 6 left" in caplog.text
    assert "Dropped 1 unreadable image(s) from the 'validation' split (--skip_bad_images), 7 left" in caplog.text
    assert "2 classes; 6 train / 7 eval examples" in caplog.text
    assert metrics["eval_samples_per_second"] > 0 and metrics["train_loss"] > 0


@pytest.mark.parametrize("read_by", ["training batch", "channel statistics"])
def test_a_split_too_large_to_check_first_names_the_image_where_it_is_read(read_by, tmp_path, monkeypatch):
    """Unchecked splits: the image is named where it is first decoded, by the training step's batch, or earlier by
    the per-channel statistics of a from-scratch model on data other than CIFAR."""
    monkeypatch.setattr(data, "CHECK_BEFORE_TRAINING", 4)  # the 8-image splits are now "large"
    if read_by == "training batch":
        monkeypatch.setattr(data, "channel_stats", lambda *args, **kwargs: ([0.5] * 3, [0.5] * 3))
    train_dir = _image_folder(tmp_path / "train", ["blue", "red"])
    (text,) = _spoil(train_dir, "red/3.png")
    eval_dir = _image_folder(tmp_path / "eval", ["blue", "red"])
    argv = _short_run(train_dir, eval_dir, tmp_path / "out", "--per_device_train_batch_size", "8")
    with pytest.raises(ValueError, match=rf"Cannot read the image {text!r} in the 'train' split: Unidentified") as e:
        train.main(argv)  # one batch of all 8 images: the first training step reads the bad one
    reader = "ImageTransform.__call__" if read_by == "training batch" else "channel_stats"
    assert reader in {entry.frame.code.raw.co_qualname for entry in e.traceback}


def test_image_transform_names_the_file_it_cannot_read():
    processor = data.ImageTransform(None, "image", "label", split="validation")
    with pytest.raises(data.InputError, match=r"Cannot read the image '/data/cat\.png' in the 'validation' split"):
        processor({"image": [{"bytes": b"not an image", "path": "/data/cat.png"}], "label": [0]})


# ---- the evaluation split: said, and a slice of train only when there is no other ----


def test_the_evaluation_split_is_the_datasets_test_split_and_is_said(monkeypatch, caplog):
    """A Hub dataset with train and test splits (as uoft-cs/cifar10, which the paper configs name) is evaluated on
    its test split, not on a slice of train."""
    rows = {"image": [PILImage.new("RGB", (8, 8), COLOURS["red"])] * 6, "label": [0, 1, 0, 1, 0, 1]}
    splits = {"train": Dataset.from_dict(rows), "test": Dataset.from_dict({k: v[:4] for k, v in rows.items()})}
    monkeypatch.setattr(data.datasets, "load_dataset", lambda *args, **kwargs: DatasetDict(splits))
    caplog.set_level("INFO")
    raw = data.load_image_dataset(dataset_name="someone/cifar-like")
    assert (len(raw["train"]), len(raw["validation"])) == (6, 4)
    assert "Evaluating on the 'test' split of someone/cifar-like (4 examples)" in caplog.text


def test_a_slice_of_train_as_the_evaluation_set_is_a_warning(tmp_path, caplog):
    train_dir = _image_folder(tmp_path / "train", ["blue", "red"], per_class=10)
    raw = data.load_image_dataset(train_file=train_dir, train_val_split=0.2)
    assert (len(raw["train"]), len(raw["validation"])) == (16, 4)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("Evaluating on 4 training examples held out" in w and "--validation_file" in w for w in warnings)


def test_a_local_folder_shows_no_download_bars(tmp_path, capfd):
    train_dir = _image_folder(tmp_path / "train", ["blue", "red"])
    capfd.readouterr()
    data.load_image_dataset(train_file=train_dir, validation_file=train_dir)
    err = capfd.readouterr().err
    assert "Downloading data" not in err and "Generating train split" not in err, err
    assert not datasets.utils.are_progress_bars_disabled()  # switched off for the local load only
