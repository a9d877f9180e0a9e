#!/usr/bin/env python
"""Train a ViT image classifier with gradient regularization (GR) and a GR warmup strategy.

    accelerate launch scripts/train.py configs/quickstart.yaml [--flag value ...]
    python scripts/train.py configs/paper/vit-ti_cifar10_adam.yaml --gr_warmup_strategy zero

The first argument may be a YAML or JSON file of arguments; flags after it override its values. Every
`TrainingArguments` and GR field (`GRTrainingArguments`) is a flag, plus the `ModelArguments` and `DataArguments`
below. Models: a Hub id or local directory (`--model_name_or_path`, fine-tuned with a new head) or the paper's
from-scratch CIFAR ViTs (`--model_config vit-ti|vit-s|vit-b`, `--config_overrides`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import transformers
import yaml
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    set_seed,
)
from transformers.models.vit import ViTImageProcessorPil
from transformers.trainer_utils import get_last_checkpoint

from hf_gr import GRTrainer, GRTrainingArguments

import image_data as data
import paper_vit as modeling

ACCURACY_PATH = str(Path(__file__).with_name("accuracy.py"))

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to train: a pretrained checkpoint or one of the paper's from-scratch ViTs."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A Hub model id or local directory to fine-tune (its image processor is used)."},
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "Train the paper's CIFAR ViT from scratch (32×32, patch 4).",
            "choices": list(modeling.PAPER_VIT_CONFIGS),
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "With --model_config: 'key=value,...' ViTConfig overrides, e.g. 'hidden_size=64'."},
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the Hub model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub models and datasets are cached."})
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Replace a pretrained classifier whose size differs from the dataset's classes."},
    )
    decoupled_weight_decay: bool = field(
        default=True,
        metadata={
            "help": "With --optim rmsprop: decay the weights directly (the paper's RMSProp) instead of torch's "
            "L2 term; alpha, eps and momentum come from --optim_args."
        },
    )


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how to read it."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset id (uoft-cs/cifar10, uoft-cs/cifar100) or 'digits' (bundled, offline)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: a parquet file or an image folder (one folder per class)."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data: a parquet file or an image folder."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: image or img)."})
    label_column: str | None = field(
        default=None, metadata={"help": "Label column (default: label, or fine_label for CIFAR-100)."}
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of train held out for evaluation when there is no eval split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use this many evaluation examples."})
    augmentation: str = field(
        default="auto",
        metadata={
            "help": "Training augmentation: basic (flip + reflect-pad + crop, the paper's), crop, none; "
            "auto = basic (none for digits).",
            "choices": list(data.AUGMENTATIONS),
        },
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, GRTrainingArguments)


# ---- arguments ----


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, GRTrainingArguments]:
    """Parse `[config.yaml|config.json] [--flag value ...]`; flags override the file, unknown keys are errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    # The whole job by default: train and evaluate unless told `--do_train false` / `--do_eval false`
    # (TrainingArguments would otherwise skip training whenever an eval_strategy is set).
    parser.set_defaults(do_train=True, do_eval=True)
    if argv and not argv[0].startswith("-"):
        parser.set_defaults(**read_config_file(argv.pop(0)))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def read_config_file(path: str) -> dict[str, Any]:
    """The arguments in a YAML or JSON file, checked against the known fields."""
    if not os.path.isfile(path):
        raise ValueError(f"Config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        config = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    config = config or {}
    if not isinstance(config, dict):
        raise ValueError(f"Config file {path!r} must hold a mapping of argument names to values.")
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"Unknown key(s) in {path}: {', '.join(unknown)}. Run with --help to list the arguments.")
    return config


def check_args(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Refuse contradictory model and data choices before anything is loaded."""
    if (model_args.model_name_or_path is None) == (model_args.model_config is None):
        raise ValueError("Give exactly one of --model_name_or_path (fine-tune) and --model_config (from scratch).")
    if model_args.config_overrides and model_args.model_config is None:
        raise ValueError("--config_overrides applies to --model_config; a pretrained model keeps its config.")
    if (data_args.dataset_name is None) == (data_args.train_file is None):
        raise ValueError("Give exactly one of --dataset_name and --train_file.")
    if data_args.validation_file is not None and data_args.train_file is None:
        raise ValueError("--validation_file needs --train_file.")


# ---- model and processor ----


def build_model_and_processor(
    model_args: ModelArguments, labels: list[str], channel_stats: tuple | None = None
) -> tuple[Any, Any]:
    """The model with a head for `labels`, and the image processor that prepares its inputs."""
    id2label = dict(enumerate(labels))
    if model_args.model_config is not None:
        config = modeling.paper_vit_config(model_args.model_config, id2label, model_args.config_overrides)
        model = modeling.paper_vit(config)
        mean, std = channel_stats
        size = {"height": config.image_size, "width": config.image_size}
        processor = ViTImageProcessorPil(size=size, image_mean=mean, image_std=std, do_resize=True)
        return model, processor
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(labels),
        id2label=id2label,
        label2id={label: i for i, label in id2label.items()},
        finetuning_task="image-classification",
        **hub_kwargs,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub_kwargs,
    )
    processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **hub_kwargs)
    return model, processor


def optimizer_override(model_args: ModelArguments, training_args: GRTrainingArguments) -> tuple | None:
    """`(DecoupledRMSprop, kwargs)` for `--optim rmsprop` with decoupled weight decay, else None (the Trainer's)."""
    if str(getattr(training_args.optim, "value", training_args.optim)) != "rmsprop":
        return None
    if not model_args.decoupled_weight_decay:
        return None
    kwargs: dict[str, Any] = {"lr": training_args.learning_rate}
    for item in filter(None, (training_args.optim_args or "").replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        if key not in ("alpha", "eps", "momentum", "centered"):
            raise ValueError(f"--optim_args for rmsprop takes alpha, eps, momentum, centered; got {key!r}.")
        kwargs[key] = value.lower() in ("true", "1", "yes") if key == "centered" else float(value)
    return modeling.DecoupledRMSprop, kwargs


def compute_metrics_fn() -> Any:
    """`compute_metrics` for the Trainer: top-1 accuracy and error rate from the shipped `evaluate` module."""
    accuracy = evaluate.load(ACCURACY_PATH)

    def compute_metrics(eval_pred: transformers.EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return accuracy.compute(predictions=np.argmax(logits, axis=1), references=eval_pred.label_ids)

    return compute_metrics


# ---- the job ----


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, evaluate, save (and push); returns the train and eval metrics."""
    model_args, data_args, training_args = parse_args(argv)
    check_args(model_args, data_args)

    # Logging: the Trainer's verbosity on the main process, warnings elsewhere.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(
        "GR: λ=%s r=%s warmup=%s", training_args.gr_lambda, training_args.gr_r, training_args.gr_warmup_strategy
    )

    # The dataset, its columns and labels: every input error surfaces here, before any model is built.
    with training_args.main_process_first(desc="loading the dataset"):
        raw = data.load_image_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.train_file,
            data_args.validation_file,
            cache_dir=model_args.cache_dir,
            train_val_split=data_args.train_val_split,
            seed=training_args.seed,
        )
    image_column, label_column = data.resolve_columns(raw["train"], data_args.image_column, data_args.label_column)
    data.resolve_columns(raw["validation"], image_column, label_column)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
    raw, labels = data.prepare_labels(raw, label_column)
    logger.info("%d classes; %d train / %d eval examples", len(labels), len(raw["train"]), len(raw["validation"]))

    # The model and its image processor (the checkpoint's own, or CIFAR normalization for from-scratch ViTs),
    # initialized from the seed: runs that differ only in their GR settings start from the same weights.
    set_seed(training_args.seed)
    stats = None
    if model_args.model_config is not None:
        stats = data.channel_stats(data_args.dataset_name or data_args.train_file, raw["train"], image_column)
    model, image_processor = build_model_and_processor(model_args, labels, stats)

    # Transforms, applied lazily to whole batches.
    image_size = int(getattr(model.config, "image_size", 32) or 32)
    augmentation = data.choose_augmentation(data_args.augmentation, data_args.dataset_name, image_size)
    raw["train"].set_transform(data.ImageTransform(image_processor, image_column, label_column, augmentation))
    raw["validation"].set_transform(data.ImageTransform(image_processor, image_column, label_column))
    training_args.remove_unused_columns = False  # the transforms need the image column

    trainer = GRTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"] if training_args.do_train else None,
        eval_dataset=raw["validation"] if training_args.do_eval else None,
        data_collator=data.collate_fn,
        compute_metrics=compute_metrics_fn(),
        processing_class=image_processor,
        optimizer_cls_and_kwargs=optimizer_override(model_args, training_args),
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir):
            checkpoint = get_last_checkpoint(training_args.output_dir)
            if checkpoint is not None:
                logger.info("Resuming from %s", checkpoint)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        metrics.update(train_result.metrics)

    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    card_kwargs = {
        "tasks": "image-classification",
        "tags": ["image-classification", "vision"],
        "finetuned_from": model_args.model_name_or_path,
        "dataset": data_args.dataset_name or _file_name(data_args.train_file),
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)
    return metrics


def _file_name(path: str | None) -> str | None:
    return Path(path).name if path else None


if __name__ == "__main__":
    main()
