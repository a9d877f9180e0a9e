"""Image-classification data for `scripts/train.py`: loading, column and label checks, transforms, collator.

Datasets come from the Hub (`uoft-cs/cifar10`, `uoft-cs/cifar100`, ...), from parquet files or image folders, or
are scikit-learn's bundled handwritten digits (`"digits"`, 1,797 real 8×8 images, no network needed).

Preprocessing is the model's image processor (resize, rescale, per-channel normalization) followed, for training,
by the paper's "basic" CIFAR augmentation done on whole batches in torch: random horizontal flip, reflect-pad
and random crop back to the input size. Reflect padding commutes with the per-channel affine normalization, so
augmenting normalized tensors equals augmenting pixels first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict
from huggingface_hub import is_offline_mode
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

DIGITS = "digits"
IMAGE_COLUMN_CANDIDATES = ("image", "img")
LABEL_COLUMN_CANDIDATES = ("label", "fine_label", "labels")
# Per-channel statistics of the training sets, for from-scratch models (the paper's normalization).
CHANNEL_STATS: dict[str, tuple[list[float], list[float]]] = {
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}
AUGMENTATIONS = ("auto", "basic", "crop", "none")
# A split of at most this many images is decoded whole before training (about 3 s for CIFAR's 32×32 PNGs, under a
# minute for photos of a few hundred pixels), so an unreadable image stops the run at once; a larger split is checked
# as its batches are read. `--skip_bad_images` checks every split whole, whatever its size.
CHECK_BEFORE_TRAINING = 10_000


class InputError(ValueError):
    """A bad argument or unusable data: `scripts/train.py` prints the message on one line and exits with status 2."""


# ---- loading ----


def load_digits_dataset(eval_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 8×8 handwritten digits as grayscale images, split deterministically into train/validation.

    Pixel values 0–16 are scaled to 0–255; the split is stratified-free but fixed by `seed`.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(pixels))
    n_eval = int(round(len(pixels) * eval_fraction))
    features = datasets.Features({"image": datasets.Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})

    def split(indices: np.ndarray) -> Dataset:
        rows = {
            "image": [Image.fromarray(pixels[i], mode="L") for i in indices],
            "label": [int(digits.target[i]) for i in indices],
        }
        return Dataset.from_dict(rows, features=features)

    return DatasetDict({"train": split(order[n_eval:]), "validation": split(order[:n_eval])})


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    cache_dir: str | None = None,
    train_val_split: float = 0.15,
    seed: int = 0,
) -> DatasetDict:
    """Load a dataset with "train" and "validation" splits from the Hub, local files or the bundled digits.

    A Hub dataset's "validation" split is used, else its "test" split, else `train_val_split` of "train".
    Local files are parquet files or image folders (one sub-folder per class).
    """
    if dataset_name == DIGITS:
        return load_digits_dataset(seed=seed)
    if dataset_name is not None:
        try:
            raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        except (ConnectionError, FileNotFoundError) as error:  # not on the Hub, or offline and not cached
            offline = " (HF_HUB_OFFLINE=1: only the local cache is searched)" if is_offline_mode() else ""
            raise InputError(f"Could not load --dataset_name {dataset_name!r}{offline}: {error}") from error
    elif train_file is not None:
        splits = {"train": _load_local(train_file, "--train_file", cache_dir)}
        if validation_file is not None:
            splits["validation"] = _load_local(validation_file, "--validation_file", cache_dir)
        raw = DatasetDict(splits)
    else:
        raise InputError("Give --dataset_name (a Hub id or 'digits') or --train_file.")
    if "train" not in raw:
        raise InputError(f"The dataset has no 'train' split; its splits are {list(raw)}.")
    source = dataset_name or train_file
    if "validation" in raw:
        where = "--validation_file" if validation_file is not None else f"the 'validation' split of {source}"
        logger.info("Evaluating on %s (%d examples)", where, len(raw["validation"]))
    elif "test" in raw:
        raw["validation"] = raw["test"]
        logger.info("Evaluating on the 'test' split of %s (%d examples)", source, len(raw["test"]))
    else:
        parts = raw["train"].train_test_split(test_size=train_val_split, seed=seed)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
        logger.warning(
            "Evaluating on %d training examples held out (--train_val_split %s): %s has no validation or test "
            "split; pass --validation_file for a test set",
            len(raw["validation"]),
            train_val_split,
            source,
        )
    return DatasetDict({"train": raw["train"], "validation": raw["validation"]})


def load_eval_only(validation_file: str | None, cache_dir: str | None = None) -> DatasetDict:
    """Evaluation alone (no training data): the "validation" split from `validation_file`, if given."""
    if validation_file is None:
        return DatasetDict()
    validation = _load_local(validation_file, "--validation_file", cache_dir)
    logger.info("Evaluating on --validation_file (%d examples)", len(validation))
    return DatasetDict({"validation": validation})


def load_test_sets(specs: list[str] | None, cache_dir: str | None = None) -> dict[str, Dataset]:
    """The held-out sets of `--test_files name=path ...`, by name, in the given order.

    A name is a metric prefix (`<name>_error_rate`): letters, digits and underscores, not `train`, `eval` or
    `validation`, each once.
    """
    sets: dict[str, Dataset] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.isidentifier() or name in ("train", "eval", "validation") or name in sets or not path:
            raise InputError(
                f"--test_files takes 'name=path' items with distinct names (letters, digits, underscores; not "
                f"train, eval or validation); got {spec!r}."
            )
        sets[name] = _load_local(path, "--test_files", cache_dir)
    return sets


def _load_local(path: str, flag: str, cache_dir: str | None) -> Dataset:
    """One split from a parquet file (or a glob of them) or an image folder, with a clear error when unreadable."""
    location = Path(path)
    if not location.exists() and not any(location.parent.glob(location.name)):
        raise InputError(f"{flag} {path!r} does not exist.")
    if location.is_dir():
        builder, kwargs = "imagefolder", {"data_dir": str(location)}
    elif location.suffix == ".parquet" or path.endswith(".parquet"):
        builder, kwargs = "parquet", {"data_files": str(location)}
    else:
        raise InputError(f"{flag} {path!r} must be a .parquet file or an image folder (one sub-folder per class).")
    # No "Downloading data" / "Generating train split" bars: nothing is downloaded from a local path.
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        loaded = datasets.load_dataset(builder, cache_dir=cache_dir, **kwargs)
    except Exception as error:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
        raise InputError(f"Could not read {flag} {path!r} as {builder}: {type(error).__name__}: {error}") from error
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    return loaded["train"]


# ---- columns and labels ----


def resolve_columns(dataset: Dataset, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The image and label column names: the given ones, checked, or detected (CIFAR-10: img/label,
    CIFAR-100: img/fine_label)."""
    columns = dataset.column_names

    def pick(given: str | None, candidates: tuple[str, ...], feature_type: type, flag: str) -> str:
        if given is not None:
            if given not in columns:
                raise InputError(f"{flag} {given!r} is not a column of the dataset; its columns are {columns}.")
            return given
        for name in candidates:
            if name in columns:
                return name
        typed = [name for name, feature in dataset.features.items() if isinstance(feature, feature_type)]
        if len(typed) == 1:
            return typed[0]
        raise InputError(f"Could not detect the {flag[2:]}; the dataset's columns are {columns}. Pass {flag}.")

    image = pick(image_column, IMAGE_COLUMN_CANDIDATES, datasets.Image, "--image_column")
    label = pick(label_column, LABEL_COLUMN_CANDIDATES, ClassLabel, "--label_column")
    return image, label


def decode_images(raw: DatasetDict, image_column: str) -> DatasetDict:
    """Make `image_column` an `Image` column in every split: images stored as {bytes, path} structs (or raw bytes)
    without the `datasets` Image feature are decoded; a column of any other type is an error naming it."""
    for split, dataset in raw.items():
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image):
            continue
        encoded = isinstance(feature, dict) and {"bytes", "path"} >= set(feature) and "bytes" in feature
        if not (encoded or getattr(feature, "dtype", None) in ("binary", "large_binary")):
            kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
            raise InputError(
                f"--image_column {image_column!r} holds {kind} values in the {split!r} split, not images; pass the "
                "column of images (PIL images or {bytes, path} structs)."
            )
        raw[split] = dataset.cast_column(image_column, datasets.Image())
    return raw


def open_image(value: Any) -> PILImage.Image:
    """A PIL image from a decoded image or a stored `{bytes, path}` value, decoded whole by `datasets` itself (EXIF
    orientation, remote paths), so that a corrupt or truncated file fails here rather than later."""
    if isinstance(value, PILImage.Image):
        return value
    return datasets.Image().decode_example(value)


def describe_image(value: Any, row: int | None, split: str) -> str:
    """How an error names an image: its file when it has one, else its row in the split when known."""
    path = value.get("path") if isinstance(value, dict) else None
    if path:
        return f"{path!r} in the {split!r} split"
    return f"in row {row} of the {split!r} split" if row is not None else f"in the {split!r} split (no file name)"


def read_image(value: Any, split: str, row: int | None = None) -> PILImage.Image:
    """`open_image`, with an unreadable image an `InputError` naming its file (or row) and the way past it."""
    try:
        return open_image(value)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise InputError(
            f"Cannot read the image {describe_image(value, row, split)}: {type(error).__name__}: {error}. Fix or "
            "remove it, or pass --skip_bad_images to check every image before training and drop unreadable ones."
        ) from error


def unreadable_images(dataset: Dataset, image_column: str) -> list[tuple[int, str]]:
    """`(row, error)` of every image in `dataset` that cannot be decoded (corrupt, truncated, not an image)."""
    stored = dataset.cast_column(image_column, datasets.Image(decode=False))
    bad, row = [], 0
    for batch in stored.select_columns([image_column]).iter(batch_size=1000):
        for value in batch[image_column]:
            try:
                open_image(value)
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
                bad.append((row, f"{type(error).__name__}: {error}"))
            row += 1
    return bad


def check_images(raw: DatasetDict, image_column: str, skip_bad: bool = False) -> DatasetDict:
    """Decode every image of each split of at most `CHECK_BEFORE_TRAINING` images (of every split when `skip_bad`):
    an unreadable one is an error naming its file and row, or with `skip_bad` is dropped, with a count.

    Larger splits are checked as their batches are read (`ImageTransform` names the file there).
    """
    for split, dataset in raw.items():
        if not skip_bad and len(dataset) > CHECK_BEFORE_TRAINING:
            continue
        bad = unreadable_images(dataset, image_column)
        if not bad:
            continue
        stored = dataset.cast_column(image_column, datasets.Image(decode=False))
        row, error = bad[0]
        first = describe_image(stored[row][image_column], row, split)
        if not skip_bad:
            more = f" ({len(bad)} unreadable images in all)" if len(bad) > 1 else ""
            raise InputError(
                f"Cannot read the image {first}: {error}{more}. Fix or remove it, or pass --skip_bad_images to drop "
                "unreadable images."
            )
        rows = {r for r, _ in bad}
        raw[split] = dataset.select([i for i in range(len(dataset)) if i not in rows])
        logger.warning(
            "Dropped %d unreadable image(s) from the %r split (--skip_bad_images), %d left; first the image %s: %s",
            len(bad), split, len(raw[split]), first, error,
        )  # fmt: skip
        if len(raw[split]) == 0:
            raise InputError(f"Every image of the {split!r} split is unreadable; first the image {first}: {error}.")
    return raw


def prepare_labels(
    raw: DatasetDict, label_column: str, names: list[str] | None = None
) -> tuple[DatasetDict, list[str]]:
    """Give every split a `ClassLabel` label column holding the training classes; return it and the class names.

    `names`, when given (a trained model's classes, for evaluation alone), are the classes instead of the
    training split's.

    The training split defines the classes: a `ClassLabel` column keeps its names, integer labels 0..K−1 are named
    "0".."K−1", string labels become classes in sorted order. The other splits are matched to them by name
    (`ClassLabel` names or strings: an image folder's classes are its sub-folders, and a validation folder may
    lack some) or by index (integers). A label outside the training classes is an error naming it.
    """
    names = names if names is not None else _training_classes(raw["train"], label_column)
    for split in raw:
        raw[split] = _to_training_classes(raw[split], split, label_column, names)
    return raw, names


def _training_classes(train: Dataset, label_column: str) -> list[str]:
    feature = train.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = train.unique(label_column)
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise InputError(f"Label {min(values)} in column {label_column!r} of 'train' is negative.")
        return [str(i) for i in range(max(values) + 1)]
    raise InputError(f"Labels in column {label_column!r} must be integers or strings, got {feature}.")


def _to_training_classes(dataset: Dataset, split: str, label_column: str, names: list[str]) -> Dataset:
    """`dataset` with its labels as indices into the training classes `names`."""
    feature, target = dataset.features[label_column], ClassLabel(names=names)
    if isinstance(feature, ClassLabel) and list(feature.names) == names:
        return dataset
    values = dataset.unique(label_column)
    if isinstance(feature, ClassLabel):  # by name: the split's own class list may differ from the training one
        values = [feature.int2str(v) for v in values]
    allowed = set(names) if all(isinstance(v, str) for v in values) else set(range(len(names)))
    unknown = sorted(set(values) - allowed, key=str)
    if unknown:
        raise InputError(
            f"Label(s) {unknown[:5]} in column {label_column!r} of the {split!r} split are outside the "
            f"{len(names)} training classes ({_describe(names)})."
        )
    if not isinstance(feature, ClassLabel):
        return dataset.cast_column(label_column, target)  # strings by name, integers by index
    index = [names.index(name) for name in feature.names]
    features = dataset.features.copy()
    features[label_column] = target
    return dataset.map(
        lambda labels: {label_column: [index[label] for label in labels]},
        input_columns=label_column,
        batched=True,
        features=features,
        desc=f"matching the {split} classes to the training classes",
    )


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:10])
    return shown + (", ..." if len(names) > 10 else "")


def channel_stats(dataset_name: str | None, train: Dataset, image_column: str, samples: int = 1000) -> tuple:
    """Per-channel mean and std for from-scratch models: CIFAR's known values, else measured on the training set."""
    name = (dataset_name or "").lower().replace("-", "")
    for key, stats in CHANNEL_STATS.items():
        if key in name:
            return stats
    subset = train.select(range(min(samples, len(train)))).cast_column(image_column, datasets.Image(decode=False))
    images = [read_image(value, "train", row).convert("RGB") for row, value in enumerate(subset[image_column])]
    pixels = np.stack([np.asarray(image, dtype=np.float64) / 255.0 for image in images])
    mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    return [round(float(m), 4) for m in mean], [round(max(float(s), 1e-3), 4) for s in std]


# ---- transforms ----


@dataclass
class Augmentation:
    """The paper's "basic" augmentation on a batch of (normalized) images: flip, reflect-pad, random crop.

    Args:
        flip (`bool`): random horizontal flip with probability 1/2.
        padding (`int`): reflect-pad each side by this many pixels, then crop back to the input size at a random
            offset (the paper: 4 on 32×32). 0 disables the crop.
    """

    flip: bool = True
    padding: int = 4

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augment `images` of shape (N, C, H, W), each image independently."""
        n, _, height, width = images.shape
        if self.flip:
            flipped = torch.rand(n) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        if self.padding > 0:
            p = self.padding
            padded = F.pad(images, (p, p, p, p), mode="reflect")
            top = torch.randint(0, 2 * p + 1, (n,))
            left = torch.randint(0, 2 * p + 1, (n,))
            rows = (top[:, None] + torch.arange(height))[:, :, None]  # (N, H, 1)
            cols = (left[:, None] + torch.arange(width))[:, None, :]  # (N, 1, W)
            batch = torch.arange(n)[:, None, None]
            images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
        return images


def choose_augmentation(name: str, dataset_name: str | None, image_size: int) -> Augmentation | None:
    """The training augmentation for `--augmentation`: "auto" is "basic" (the paper's), except "none" for the
    8×8 digits (a flipped digit is another symbol, and a 1-pixel shift of an 8×8 digit costs accuracy);
    padding is 1/8 of the side (4 on 32×32)."""
    if name not in AUGMENTATIONS:
        raise InputError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)}, got {name!r}.")
    if name == "auto":
        name = "none" if dataset_name == DIGITS else "basic"
    if name == "none":
        return None
    return Augmentation(flip=name == "basic", padding=max(1, image_size // 8))


class ImageTransform:
    """The `set_transform` function: images → `pixel_values` through the image processor (+ augmentation).

    Args:
        image_processor: the model's image processor (resize, rescale, normalize).
        image_column (`str`), label_column (`str`): the dataset's columns.
        augmentation (`Augmentation`, *optional*): applied to the whole batch after the processor (training only).
        split (`str`, *optional*, defaults to `"train"`): the split's name, for the error on an unreadable image.

    The image column may hold decoded images or stored `{bytes, path}` values (`datasets.Image(decode=False)`):
    those are decoded here, so that an unreadable image is an `InputError` naming its file rather than a traceback
    from inside `datasets`.
    """

    def __init__(
        self,
        image_processor: Any,
        image_column: str,
        label_column: str,
        augmentation: Augmentation | None = None,
        split: str = "train",
    ) -> None:
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.augmentation = augmentation
        self.split = split

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        images = [read_image(value, self.split).convert("RGB") for value in batch[self.image_column]]
        pixel_values = self._already_sized(images)
        if pixel_values is None:
            pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if self.augmentation is not None:
            pixel_values = self.augmentation(pixel_values)
        return {"pixel_values": list(pixel_values), "labels": batch[self.label_column]}

    def _already_sized(self, images: list) -> torch.Tensor | None:
        """The processor's output computed in one vectorized step, when every image already has the processor's
        (height, width) and the processor only resizes, rescales and normalizes (ViT's); else None."""
        p = self.image_processor
        size = getattr(p, "size", None)
        height, width = (_size_field(size, "height"), _size_field(size, "width")) if size is not None else (None, None)
        plain = not any(getattr(p, flag, False) for flag in ("do_center_crop", "do_pad", "do_reduce_labels"))
        if not (plain and height and width and getattr(p, "do_rescale", False)):
            return None
        if any(image.size != (width, height) for image in images):
            return None
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
        pixels = pixels.to(torch.float32) * p.rescale_factor
        if getattr(p, "do_normalize", False):
            mean = torch.tensor(p.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(p.image_std, dtype=torch.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return pixels.contiguous()


def _size_field(size: Any, name: str) -> int | None:
    """A field of an image processor's `size` (a dict, or transformers' `SizeDict`)."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack `pixel_values` and `labels` into the model's batch."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }
