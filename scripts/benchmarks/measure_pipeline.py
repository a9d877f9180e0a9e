#!/usr/bin/env python
"""Is the input pipeline the bottleneck? Images/s of train.py's data pipeline versus its training step.

    python scripts/benchmarks/measure_pipeline.py --train_file CIFAR10_DIR/train.parquet [--model_config vit-ti]
    python scripts/benchmarks/measure_pipeline.py --batch_size 64 --augmentation none --config_overrides \
        "image_size=8,patch_size=4,hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128"

Pipeline: decode → image processor → the paper's augmentation → collate, through a `DataLoader` with
`--num_workers` workers (the Trainer's default is 0: the main process). Step: one plain AdamW step
(forward + backward + update) of the from-scratch ViT; a GR step runs two forward/backward passes (~2× that).
`--train_file digits` (the default) uses scikit-learn's bundled digits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers.models.vit import ViTImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the recipe's data and model helpers

import image_data as data  # noqa: E402
import paper_vit as modeling  # noqa: E402


def measure_pipeline(loader: DataLoader, batches: int) -> float:
    """Images/s drawn from `loader` over `batches` batches (after one warm-up batch)."""
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(iterator)["labels"])
    return images / (time.perf_counter() - start)


def measure_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int) -> float:
    """Images/s of plain AdamW training steps on `batch` (after one warm-up step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.3)
    model.train()
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * len(batch["labels"]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_file", default="digits", help="a parquet file, or digits (the default)")
    parser.add_argument("--model_config", default="vit-ti", choices=list(modeling.PAPER_VIT_CONFIGS))
    parser.add_argument("--config_overrides", default=None)
    parser.add_argument("--augmentation", default="basic", choices=list(data.AUGMENTATIONS))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.train_file != data.DIGITS and not Path(args.train_file).is_file():
        parser.error(f"--train_file {args.train_file}: no such file (a parquet file, or {data.DIGITS})")
    source = args.train_file
    raw = data.load_image_dataset(
        dataset_name=data.DIGITS if source == data.DIGITS else None,
        train_file=None if source == data.DIGITS else source,
    )
    image_column, label_column = data.resolve_columns(raw["train"], None, None)
    raw, labels = data.prepare_labels(raw, label_column)
    config = modeling.paper_vit_config(args.model_config, dict(enumerate(labels)), args.config_overrides)
    mean, std = data.channel_stats(source, raw["train"], image_column)
    size = {"height": config.image_size, "width": config.image_size}
    processor = ViTImageProcessorPil(size=size, image_mean=mean, image_std=std)
    augmentation = data.choose_augmentation(args.augmentation, source, config.image_size)
    train = raw["train"]
    train.set_transform(data.ImageTransform(processor, image_column, label_column, augmentation))
    loader = DataLoader(
        train, batch_size=args.batch_size, shuffle=True, collate_fn=data.collate_fn, num_workers=args.num_workers
    )

    pipeline_rate = measure_pipeline(loader, args.batches)
    batch = next(iter(loader))
    step_rate = measure_step(modeling.paper_vit(config), batch, args.steps)
    print(f"data: {source} ({len(train)} rows), batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"pipeline ({args.num_workers} workers): {pipeline_rate:,.0f} images/s")
    print(f"{args.model_config} plain step: {step_rate:,.1f} images/s; GR step (2 passes): ~{step_rate / 2:,.1f}")
    print(f"pipeline / plain step: {pipeline_rate / step_rate:,.0f}x")


if __name__ == "__main__":
    main()
