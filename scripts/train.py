#!/usr/bin/env python
"""Train a ViT image classifier with gradient regularization (GR) and a GR warmup strategy.

    python scripts/train.py configs/quickstart.yaml [--flag value ...]
    python scripts/train.py configs/paper/vit-ti_cifar10_adam.yaml --gr_warmup_strategy zero

The first argument may be a YAML or JSON file of arguments; flags after it override its values, and a data or
model source given as a flag replaces the file's (`--train_file` drops its `dataset_name`, and so on). Every
`TrainingArguments` and GR field (`GRTrainingArguments`) is a flag, plus the `ModelArguments` and `DataArguments`
below. Models: a Hub id or local directory (`--model_name_or_path`, fine-tuned with a new head) or the paper's
from-scratch CIFAR ViTs (`--model_config vit-ti|vit-s|vit-b`, `--config_overrides`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
import transformers
import yaml
from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache
from huggingface_hub.constants import HF_HUB_CACHE
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainerState,
    ViTForImageClassification,
    set_seed,
)
from transformers.models.vit import ViTImageProcessorPil
from transformers.trainer_utils import get_last_checkpoint

from hf_gr import GRTrainer, GRTrainingArguments
from hf_gr.arguments import optimizer_name

import image_data as data
import paper_vit as modeling

ACCURACY_PATH = str(Path(__file__).with_name("accuracy.py"))
TRAINER_STATE = "trainer_state.json"

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to train: a pretrained checkpoint or one of the paper's from-scratch ViTs."""

    _argument_group_name = "model"

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
        metadata={
            "help": "Replace a pretrained classifier whose size differs from the dataset's classes by a new one "
            "(--no_ignore_mismatched_sizes: stop with an error instead)."
        },
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

    _argument_group_name = "data"

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
    test_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Held-out sets evaluated once, after training: 'name=path' (parquet file or image folder) each; "
            "their metrics are logged and saved as '<name>_error_rate' etc. Nothing is selected on them."
        },
    )
    augmentation: str = field(
        default="auto",
        metadata={
            "help": "Training augmentation: basic (flip + reflect-pad + crop, the paper's), crop, none; "
            "auto = basic (none for digits).",
            "choices": list(data.AUGMENTATIONS),
        },
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={
            "help": "Decode every image before training and drop the unreadable ones (corrupt, truncated), with a "
            "count. Without it an unreadable image is an error naming its file: before training in a split of at "
            f"most {data.CHECK_BEFORE_TRAINING:,} images (all decoded first), when its batch is read in a larger one."
        },
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, GRTrainingArguments)
# A data or model source given as a flag replaces the config file's other source: these are the file's keys it drops.
REPLACES = {
    "dataset_name": ("train_file", "validation_file"),
    "train_file": ("dataset_name", "dataset_config_name"),
    "model_name_or_path": ("model_config", "config_overrides"),
    "model_config": ("model_name_or_path",),
}
InputError = data.InputError


# ---- arguments ----


class ScriptArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors raise `InputError` (one line and exit status 2 from the command line)."""

    def error(self, message: str):
        raise InputError(message)


def build_parser() -> ScriptArgumentParser:
    """The parser; `--help` lists the model, data and GR (`gr_*`) options first, then the Trainer's own."""
    parser = ScriptArgumentParser(
        ARGUMENT_CLASSES,
        usage="%(prog)s [config.yaml|config.json] [--flag value ...]",
        description="Train a ViT image classifier with gradient regularization (GR). The optional first argument "
        "is a YAML or JSON file of arguments; flags after it override its values.",
    )
    gr_group = parser.add_argument_group("gradient regularization (GR)")
    trainer_group = parser.add_argument_group("training (transformers.TrainingArguments)")
    for action in [a for a in parser._optionals._group_actions if a.dest != "help"]:
        parser._optionals._group_actions.remove(action)
        (gr_group if action.dest.startswith("gr_") else trainer_group)._group_actions.append(action)
    for action in parser._actions:  # HfArgumentParser gives `--no_x` the help of `--x`, which says the opposite
        if action.option_strings and action.option_strings[0] == f"--no_{action.dest}":
            action.help = f"Set --{action.dest} to false."
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, GRTrainingArguments]:
    """Parse `[config.yaml|config.json] [--flag value ...]` and check the model and data choices.

    Flags override the file; a data or model source given as a flag replaces the file's other one (`REPLACES`);
    unknown keys and contradictions are errors that say whether each value came from the file or a flag.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # The whole job by default: train and evaluate unless told `--do_train false` / `--do_eval false`
    # (TrainingArguments would otherwise skip training whenever an eval_strategy is set).
    parser.set_defaults(do_train=True, do_eval=True)
    config_file, config = None, {}
    if argv and not argv[0].startswith("-"):
        config_file = argv.pop(0)
        config = read_config_file(config_file)
    flags = given_as_flags(argv)
    for key in flags & REPLACES.keys():
        for replaced in REPLACES[key]:
            config.pop(replaced, None)
    parser.set_defaults(**config)
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except InputError as error:
        raise InputError(f"{error}{did_you_mean(parser, argv)}") from error
    except ValueError as error:  # unused flags, and the checks of TrainingArguments and the GR fields
        raise InputError(f"{error}{did_you_mean(parser, argv)}") from error
    origins = {key: f"config file {config_file}" for key in config if key not in flags}
    check_args(model_args, data_args, origins, do_train=training_args.do_train)
    if model_args.model_config is not None and not training_args.do_train:
        raise InputError(
            f"--do_train false with --model_config {model_args.model_config!r} would evaluate an untrained, randomly "
            "initialized model. To evaluate a trained one, give its folder (the --output_dir of the run that trained "
            "it) as --model_name_or_path instead of --model_config."
        )
    return model_args, data_args, training_args


def did_you_mean(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """A "did you mean --x?" hint for each flag in `argv` the parser does not know and that is close to one it does."""
    known = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or flag in known or any(option.startswith(flag) for option in known):
            continue
        close = difflib.get_close_matches(flag, known, n=1)
        if close:
            hints.append(f"did you mean {close[0]} (not {flag})?")
    return "; " + "; ".join(hints) if hints else ""


def given_as_flags(argv: list[str]) -> set[str]:
    """The fields `argv` sets, however spelled (`--x v`, `--x=v`, `--no_x`, an unambiguous prefix)."""
    probe = build_parser()
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))


def read_config_file(path: str) -> dict[str, Any]:
    """The arguments in a YAML or JSON file, checked against the known fields."""
    if not os.path.isfile(path):
        raise InputError(f"Config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        config = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    config = config or {}
    if not isinstance(config, dict):
        raise InputError(f"Config file {path!r} must hold a mapping of argument names to values.")
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init}
    unknown = sorted(set(config) - known)
    if unknown:
        close = {key: difflib.get_close_matches(key, sorted(known), n=1) for key in unknown}
        hints = [f"{key} (did you mean {close[key][0]}?)" if close[key] else key for key in unknown]
        raise InputError(f"Unknown key(s) in {path}: {', '.join(hints)}. Run with --help to list the arguments.")
    return config


def check_args(model_args: ModelArguments, data_args: DataArguments, origins: dict[str, str] | None = None,
               do_train: bool = True) -> None:  # fmt: skip
    """Refuse contradictory model and data choices before anything is loaded; `origins` says which values came
    from the config file (the others came from the command line). Without training (`do_train` false) only the
    data evaluated is needed: --validation_file or --test_files (or a dataset)."""
    origins = origins or {}

    def given(args: Any, *keys: str) -> str:
        values = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
        return " and ".join(f"--{k} {v!r} ({origins.get(k, 'command line')})" for k, v in values.items()) or "neither"

    if (model_args.model_name_or_path is None) == (model_args.model_config is None):
        raise InputError(
            "Give exactly one of --model_name_or_path (fine-tune) and --model_config (from scratch); got "
            f"{given(model_args, 'model_name_or_path', 'model_config')}."
        )
    if model_args.config_overrides and model_args.model_config is None:
        raise InputError(
            f"--config_overrides applies to --model_config; a pretrained model keeps its config. Got "
            f"{given(model_args, 'config_overrides', 'model_name_or_path')}."
        )
    if not do_train and data_args.dataset_name is None and data_args.train_file is None:
        if data_args.validation_file is None and not data_args.test_files:
            raise InputError(
                "--do_train false evaluates a trained model: give the data to evaluate, --validation_file (and/or "
                "--test_files name=path), or --dataset_name."
            )
        return
    if (data_args.dataset_name is None) == (data_args.train_file is None):
        sources = given(data_args, "dataset_name", "train_file")
        raise InputError(f"Give exactly one of --dataset_name and --train_file; got {sources}.")
    if data_args.validation_file is not None and data_args.train_file is None:
        raise InputError(f"--validation_file needs --train_file; got {given(data_args, 'validation_file')}.")


def find_checkpoint(training_args: GRTrainingArguments) -> str | None:
    """The checkpoint training resumes from: `--resume_from_checkpoint` (which must be a checkpoint directory), else
    the last `checkpoint-N` in `--output_dir`; None for a fresh run (and without `--do_train`)."""
    if not training_args.do_train:
        return None
    given = training_args.resume_from_checkpoint
    if given is None:
        if os.path.isdir(training_args.output_dir):
            return get_last_checkpoint(training_args.output_dir)
        return None
    if not os.path.isdir(given):
        what = "is a file" if os.path.exists(given) else "does not exist"
        raise InputError(
            f"--resume_from_checkpoint {given!r} {what}: give a checkpoint directory (OUTPUT_DIR/checkpoint-N), or "
            "leave it out: training resumes from the last checkpoint in --output_dir by itself."
        )
    if not os.path.isfile(os.path.join(given, TRAINER_STATE)):
        raise InputError(
            f"--resume_from_checkpoint {given!r} is not a checkpoint (it has no {TRAINER_STATE}): give a "
            "checkpoint-N directory that the Trainer saved."
        )
    return given


def checkpoint_step(directory: str) -> int | None:
    """The step a checkpoint (or a finished run's output directory) was saved at; None without its trainer state."""
    path = os.path.join(directory, TRAINER_STATE)
    return TrainerState.load_from_json(path).global_step if os.path.isfile(path) else None


def resume_message(checkpoint: str, training_args: GRTrainingArguments) -> str:
    """The line that says where training picks up, and (when found in --output_dir) how to start over instead."""
    step = checkpoint_step(checkpoint)
    if training_args.resume_from_checkpoint is not None:
        return f"Resuming from {checkpoint} (step {step})"
    out = training_args.output_dir
    name = Path(checkpoint).name
    return f"Resuming from {name} (step {step}) in {out}; to start over, remove {out} or pass another --output_dir"


def check_hub_reachable(training_args: GRTrainingArguments) -> None:
    """With `--push_to_hub`: refuse now, not after training, when offline, not logged in, or the Hub is out of
    reach, naming the local alternative (the model is saved in --output_dir either way)."""
    if not training_args.push_to_hub:
        return
    out = training_args.output_dir
    later = (
        f"Without --push_to_hub the trained model is saved in {out} only; upload it later with "
        f"`hf upload {training_args.hub_model_id or 'USER/REPO'} {out}`."
    )
    if is_offline_mode():
        raise InputError(f"--push_to_hub needs the Hub, but HF_HUB_OFFLINE=1 forbids reaching it. {later}")
    try:
        HfApi(endpoint=None).whoami(token=training_args.hub_token)
    except LocalTokenNotFoundError as error:
        raise InputError(
            f"--push_to_hub needs a Hub token: log in with `hf auth login`, set HF_TOKEN or pass --hub_token. {later}"
        ) from error
    except HfHubHTTPError as error:
        raise InputError(f"--push_to_hub: the Hub refused the token ({error}). {later}") from error
    except Exception as error:  # no network, DNS, proxy, timeout: the HTTP client's own exception types
        reason = f"{type(error).__name__}: {error}"
        raise InputError(f"--push_to_hub: the Hub cannot be reached ({reason}). {later}") from error


def quiet_defaults(training_args: GRTrainingArguments, model: Any) -> None:
    """Turn off what only warns in this setting: pinned memory without an accelerator, and DDP's search for unused
    parameters when the model uses every parameter in each forward pass (a ViT classifier; the search costs a
    pass over the graph per step and warns on every rank when it finds nothing). Explicit flags are kept."""
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False
    if training_args.ddp_find_unused_parameters is None and type(model) is ViTForImageClassification:
        training_args.ddp_find_unused_parameters = False


def training_done(trainer: GRTrainer, checkpoint: str) -> tuple[int, int] | None:
    """`(step reached, this run's last step)` when the run being resumed has nothing left to train (the checkpoint,
    or a finished run's final state in --output_dir, is at or past this run's last step); None when training remains.
    """
    args = trainer.args
    steps = [checkpoint_step(checkpoint) or 0]
    if args.resume_from_checkpoint is None:  # resumed from --output_dir: its final state, when the run finished
        steps.append(checkpoint_step(args.output_dir) or 0)
    max_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    return (max(steps), max_steps) if max(steps) >= max_steps else None


def cap_dataloader_workers(training_args: GRTrainingArguments) -> None:
    """At most one data-loader worker per CPU this process may use (torch warns beyond that)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if training_args.dataloader_num_workers > cpus:
        logger.info("dataloader_num_workers %d → %d: one per CPU", training_args.dataloader_num_workers, cpus)
        training_args.dataloader_num_workers = cpus


def model_labels(model_args: ModelArguments) -> list[str]:
    """The class names a trained model was saved with (its config's id2label, by index)."""
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def cpu_threads(training_args: GRTrainingArguments) -> int | None:
    """On a CPU, without OMP_NUM_THREADS: one torch thread per core that other processes leave idle (at least one).

    OpenMP threads competing with busy processes for the same cores slow a step down many times over; set
    OMP_NUM_THREADS to choose the count yourself. Returns the count set, or None when nothing was changed.
    """
    if training_args.device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = math.ceil(os.getloadavg()[0] - 0.25) if hasattr(os, "getloadavg") else 0  # 0.25: idle noise
    threads = max(1, min(cpus, cpus - max(busy, 0)))
    torch.set_num_threads(threads)
    logger.info("CPU: %d torch thread(s) for %d core(s) with load %.1f; set OMP_NUM_THREADS to choose.",
                threads, cpus, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)  # fmt: skip
    return threads


# ---- model and processor ----


def build_model_and_processor(
    model_args: ModelArguments, labels: list[str], channel_stats: tuple | None = None
) -> tuple[Any, Any]:
    """The model with a head for `labels`, and the image processor that prepares its inputs."""
    id2label = dict(enumerate(labels))
    if model_args.model_config is not None:
        try:
            config = modeling.paper_vit_config(model_args.model_config, id2label, model_args.config_overrides)
        except ValueError as error:  # an unknown name or override
            raise InputError(str(error)) from error
        model = modeling.paper_vit(config)
        mean, std = channel_stats
        size = {"height": config.image_size, "width": config.image_size}
        processor = ViTImageProcessorPil(size=size, image_mean=mean, image_std=std, do_resize=True)
        return model, processor
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    try:
        config = AutoConfig.from_pretrained(  # the number of labels follows id2label (also passing it warns)
            model_args.model_name_or_path,
            id2label=id2label,
            label2id={label: i for i, label in id2label.items()},
            finetuning_task="image-classification",
            **hub_kwargs,
        )
    except OSError as error:  # no such model, or it cannot be fetched
        raise InputError(f"Could not load --model_name_or_path {model_args.model_name_or_path!r}: {error}") from error
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub_kwargs,
    )
    processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path, **hub_kwargs)
    return model, processor


def check_model_available(model_args: ModelArguments) -> None:
    """Offline, a Hub model id must be in the local cache: say so, by name, before any data is loaded."""
    name = model_args.model_name_or_path
    if name is None or os.path.isdir(name) or not is_offline_mode():
        return
    try:
        cached = try_to_load_from_cache(name, "config.json", model_args.cache_dir, model_args.model_revision)
    except ValueError:  # not a valid repo id
        cached = None
    if not isinstance(cached, str):
        raise InputError(
            f"Model {name!r} is not in the local cache ({model_args.cache_dir or HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
            "forbids downloading it: download it once online, point HF_HUB_CACHE at a cache holding it, or pass a "
            "local directory."
        )


def optimizer_override(model_args: ModelArguments, training_args: GRTrainingArguments) -> tuple | None:
    """`(DecoupledRMSprop, kwargs)` for `--optim rmsprop` with decoupled weight decay, else None (the Trainer's)."""
    if optimizer_name(training_args) != "rmsprop":
        return None
    if not model_args.decoupled_weight_decay:
        return None
    kwargs: dict[str, Any] = {"lr": training_args.learning_rate}
    for item in filter(None, (training_args.optim_args or "").replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        if key not in ("alpha", "eps", "momentum", "centered"):
            raise InputError(f"--optim_args for rmsprop takes alpha, eps, momentum, centered; got {key!r}.")
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
    # Arguments: the config file, then flags; contradictions, a missing checkpoint, an uncached model and a Hub
    # that cannot be reached stop the run here.
    model_args, data_args, training_args = parse_args(argv)
    checkpoint = find_checkpoint(training_args)
    check_model_available(model_args)
    check_hub_reachable(training_args)

    # Logging: this script's INFO lines on the main process (--log_level sets them and the Trainer's verbosity).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    passive = training_args.log_level == "passive" and training_args.should_log
    logger.setLevel(logging.INFO if passive else log_level)
    if training_args.do_train:
        logger.info(
            "GR: λ=%s r=%s warmup=%s", training_args.gr_lambda, training_args.gr_r, training_args.gr_warmup_strategy
        )
    else:
        logger.info("Evaluation only (--do_train false): %s is evaluated, nothing is trained.",
                    model_args.model_name_or_path)  # fmt: skip
    if checkpoint is not None:
        logger.info(resume_message(checkpoint, training_args))
    cap_dataloader_workers(training_args)
    cpu_threads(training_args)

    # The dataset, its columns and labels: every input error surfaces here, before any model is built.
    with training_args.main_process_first(desc="loading the dataset"):
        if data_args.dataset_name is None and data_args.train_file is None:  # evaluation only: no training data
            raw = data.load_eval_only(data_args.validation_file, model_args.cache_dir)
        else:
            raw = data.load_image_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                data_args.train_file,
                data_args.validation_file,
                cache_dir=model_args.cache_dir,
                train_val_split=data_args.train_val_split,
                seed=training_args.seed,
            )
    test_sets = data.load_test_sets(data_args.test_files, model_args.cache_dir)
    raw.update(test_sets)
    first = next(iter(raw.values()))
    image_column, label_column = data.resolve_columns(first, data_args.image_column, data_args.label_column)
    for split in raw:
        data.resolve_columns(raw[split], image_column, label_column)
    raw = data.decode_images(raw, image_column)
    raw = data.check_images(raw, image_column, data_args.skip_bad_images)
    if data_args.max_train_samples is not None and "train" in raw:
        raw["train"] = raw["train"].shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None and "validation" in raw:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
    # The classes: the training split's, or (evaluation only) those the trained model was saved with.
    raw, labels = data.prepare_labels(raw, label_column, None if "train" in raw else model_labels(model_args))
    sizes = " / ".join(f"{len(split)} {'eval' if name == 'validation' else name}" for name, split in raw.items())
    logger.info("%d classes; %s examples", len(labels), sizes)

    # The model and its image processor (the checkpoint's own, or CIFAR normalization for from-scratch ViTs),
    # initialized from the seed: runs that differ only in their GR settings start from the same weights.
    set_seed(training_args.seed)
    stats = None
    if model_args.model_config is not None:
        stats = data.channel_stats(data_args.dataset_name or data_args.train_file, raw["train"], image_column)
    model, image_processor = build_model_and_processor(model_args, labels, stats)
    quiet_defaults(training_args, model)

    # Transforms, applied lazily to whole batches; they decode the stored images themselves, so that an unreadable
    # one in a split too large to check beforehand is an error naming its file.
    image_size = int(getattr(model.config, "image_size", 32) or 32)
    augmentation = data.choose_augmentation(data_args.augmentation, data_args.dataset_name, image_size)
    for split in raw:
        raw[split] = raw[split].cast_column(image_column, datasets.Image(decode=False))
        augment = augmentation if split == "train" else None
        raw[split].set_transform(data.ImageTransform(image_processor, image_column, label_column, augment, split))
    training_args.remove_unused_columns = False  # the transforms need the image column

    trainer = GRTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"] if training_args.do_train else None,
        eval_dataset=raw.get("validation") if training_args.do_eval else None,
        data_collator=data.collate_fn,
        compute_metrics=compute_metrics_fn(),
        processing_class=image_processor,
        optimizer_cls_and_kwargs=optimizer_override(model_args, training_args),
    )

    metrics: dict[str, float] = {}
    if checkpoint is not None and (done := training_done(trainer, checkpoint)) is not None:
        return finished_run(training_args, *done)
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        metrics.update(train_result.metrics)

    if training_args.do_eval and "validation" in raw:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    # The held-out test sets: once, at the end (nothing is chosen on them).
    for name in test_sets:
        test_metrics = trainer.evaluate(eval_dataset=raw[name], metric_key_prefix=name)
        trainer.log_metrics(name, test_metrics)
        trainer.save_metrics(name, test_metrics)
        metrics.update(test_metrics)

    if not training_args.do_train:  # the folder's own card describes how its model was trained: leave it as it is
        logger.info("Evaluation only: no model card written, nothing pushed.")
        return metrics
    card_kwargs = {
        "tasks": "image-classification",
        "tags": ["image-classification", "vision"],
        "finetuned_from": model_args.model_name_or_path,
        "dataset": data_args.dataset_name or dataset_label(data_args.train_file),
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)
    return metrics


def finished_run(training_args: GRTrainingArguments, step: int, max_steps: int) -> dict[str, float]:
    """A rerun of a run that has nothing left to train: say so, keep its results and model; return its metrics."""
    out = training_args.output_dir
    logger.info(
        "The run in %s is complete (step %d of %d): nothing to train, its model and results are kept. To train "
        "longer, raise --num_train_epochs or --max_steps; to start over, remove %s or pass another --output_dir.",
        out, step, max_steps, out,
    )  # fmt: skip
    if training_args.push_to_hub:
        repo = training_args.hub_model_id or "USER/REPO"
        logger.info("Nothing pushed: upload the finished model with `hf upload %s %s`", repo, out)
    results = os.path.join(out, "all_results.json")
    if not os.path.isfile(results):
        return {}
    with open(results, encoding="utf-8") as f:
        return json.load(f)


def dataset_label(path: str | None) -> str | None:
    """How a model card names local training data: the file or folder's name, or, for one named after its split
    (`cifar10/train.parquet`, `pets/train/`), the folder it sits in."""
    if not path:
        return None
    location = Path(path.rstrip("/"))
    return location.parent.name or location.stem if location.stem in ("train", "training") else location.stem


def error_line(error: Exception) -> str:
    """The one line printed for an `InputError`; one raised in a data-loader worker comes back wrapped in the
    worker's traceback, whose last line is the message."""
    message = str(error)
    if "Original Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        message = last.split("InputError: ", 1)[-1]
    return f"error: {' '.join(message.split())}"


if __name__ == "__main__":
    try:
        main()
    except InputError as error:  # a bad argument or unusable data: one line, no traceback
        print(error_line(error), file=sys.stderr)
        sys.exit(2)
