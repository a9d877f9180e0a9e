"""Building blocks of `gpu_check.py` beside it: the carried CIFAR subset, GPU augmentation, models, a float64 GR
reference, and Trainer plumbing (a fixed batch, gradient capture, step timing, host-sync counting).

Everything here runs on CPU as well as on CUDA, so the dry run (`gpu_check.py --dry-run`) exercises the same code.
Only APIs present in transformers 5.17 (the GPU machine's) are used.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification

DATA_FILE = "cifar10_subset.npz"
CODING = "rgb-minus-green, 2d-delta, uint8 wraparound (v1)"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
HOST_SYNCS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")


# ---- the carried CIFAR-10 subset ----


def encode_images(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) uint8 → residuals that zlib compresses to ~61% (raw pixels: ~92%), exactly invertible.

    R and B become R − G and B − G, then each plane is differenced along W and H (uint8 arithmetic wraps).
    """
    y = x.copy()
    y[:, 0] -= x[:, 1]
    y[:, 2] -= x[:, 1]
    y = np.diff(y, axis=-1, prepend=np.uint8(0))
    return np.diff(y, axis=-2, prepend=np.uint8(0))


def decode_images(d: np.ndarray) -> np.ndarray:
    """The inverse of `encode_images`."""
    y = np.cumsum(np.cumsum(d, axis=-2, dtype=np.uint8), axis=-1, dtype=np.uint8)
    y[:, 0] += y[:, 1]
    y[:, 2] += y[:, 1]
    return y


def _decode_png_column(column: list[dict[str, Any]]) -> np.ndarray:
    from PIL import Image

    images = [np.asarray(Image.open(io.BytesIO(item["bytes"])).convert("RGB")) for item in column]
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


def prepare_data(out_dir: Path, source: Path, n_train: int = 20_000, n_test: int = 5_000) -> dict[str, Any]:
    """Decode a class-balanced slice of CIFAR-10 train (the first n_train/10 rows of each class) and test rows
    0..n_test-1 from the Hub-layout parquet files into `out_dir/cifar10_subset.npz` (np.savez_compressed)."""
    import pyarrow.parquet as pq

    train = pq.read_table(source / "train.parquet", columns=["img", "label"])
    labels = np.asarray(train.column("label"))
    per_class = n_train // 10
    chosen = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    train_x = _decode_png_column(train.take(chosen).column("img").to_pylist())
    test = pq.read_table(source / "test.parquet", columns=["img", "label"]).slice(0, n_test)
    test_x = _decode_png_column(test.column("img").to_pylist())
    exact = np.zeros(len(test_x), dtype=bool)
    provenance = source / "test_provenance.csv"
    if provenance.exists():
        with open(provenance, newline="") as f:
            for row in csv.DictReader(f):
                index = int(next(iter(row.values())))
                if index < len(exact):
                    exact[index] = row["pixels"] == "exact"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DATA_FILE
    np.savez_compressed(
        path, train_x=encode_images(train_x), train_y=labels[chosen].astype(np.uint8),
        test_x=encode_images(test_x), test_y=np.asarray(test.column("label")).astype(np.uint8),
        test_exact=exact, coding=np.array(CODING),
    )  # fmt: skip
    return {"path": str(path), "bytes": path.stat().st_size, "train": len(train_x), "test": len(test_x),
            "test_exact": int(exact.sum())}  # fmt: skip


@dataclass
class ImageData:
    """uint8 images (N, 3, 32, 32) and int64 labels, train and test; `test_exact` marks pixel-exact test rows."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_exact: torch.Tensor
    source: str

    def to(self, device: torch.device) -> ImageData:
        moved = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y", "test_exact")}
        return ImageData(**moved, source=self.source)


def load_data(path: Path, n_train: int | None = None, n_test: int | None = None) -> ImageData:
    """The file `prepare_data` wrote (optionally only its first rows)."""
    with np.load(path) as f:
        if str(f["coding"]) != CODING:
            raise ValueError(f"{path}: unknown coding {str(f['coding'])!r}; rerun --prepare-data")
        train_x, test_x = decode_images(f["train_x"][:n_train]), decode_images(f["test_x"][:n_test])
        train_y, test_y, exact = f["train_y"][:n_train], f["test_y"][:n_test], f["test_exact"][:n_test]
    return ImageData(torch.from_numpy(train_x), torch.from_numpy(train_y.astype(np.int64)),
                     torch.from_numpy(test_x), torch.from_numpy(test_y.astype(np.int64)),
                     torch.from_numpy(exact), source=str(path))  # fmt: skip


def synthetic_data(n_train: int, n_test: int, seed: int = 0) -> ImageData:
    """Random 32×32 images whose class shifts the mean colour (learnable), for the dry run without data."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(40, 216, (10, 3, 1, 1), generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = colours[y] + torch.randint(-40, 41, (n, 3, 32, 32), generator=g)
        return x.clamp(0, 255).to(torch.uint8), y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return ImageData(train_x, train_y, test_x, test_y, torch.ones(n_test, dtype=torch.bool), source="synthetic")


class IndexDataset(torch.utils.data.Dataset):
    """0..n-1: the collators below turn a list of indices into a batch already on the device."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class AugmentingCollator:
    """The paper's CIFAR augmentation on the device: random flip, reflect-pad 4 + random 32×32 crop, normalize."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> None:
        self.images, self.labels = images, labels
        device = images.device
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.base = torch.arange(32, device=device)

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        device = self.images.device
        idx = torch.tensor(indices, device=device)
        x = self.images[idx].float()
        n = len(indices)
        flip = torch.rand(n, device=device, generator=self.generator) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        x = F.pad(x, (4, 4, 4, 4), mode="reflect")
        offsets = torch.randint(0, 9, (2, n), device=device, generator=self.generator)
        rows = (offsets[0].view(n, 1) + self.base).view(n, 1, 32, 1)
        cols = (offsets[1].view(n, 1) + self.base).view(n, 1, 1, 32)
        x = x[torch.arange(n, device=device).view(n, 1, 1, 1), torch.arange(3, device=device).view(1, 3, 1, 1),
              rows, cols]  # fmt: skip
        return {"pixel_values": (x - self.mean) / self.std, "labels": self.labels[idx]}


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) → the model's input, as `AugmentingCollator` normalizes."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


@torch.no_grad()
def eval_error(model: torch.nn.Module, data: ImageData, bf16: bool, chunk: int = 1000) -> dict[str, float]:
    """Test error in % on all test rows and on the pixel-exact ones (model left in train mode)."""
    model.eval()
    wrong = []
    try:
        for start in range(0, len(data.test_y), chunk):
            x = normalize(data.test_x[start : start + chunk])
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(pixel_values=x).logits
            wrong.append(logits.argmax(-1) != data.test_y[start : start + chunk])
    finally:
        model.train()
    wrong_all = torch.cat(wrong).float()
    exact = data.test_exact
    exact_error = round(100 * float(wrong_all[exact].mean()), 3) if exact.any() else None
    return {"eval_error": round(100 * float(wrong_all.mean()), 3), "eval_error_exact_rows": exact_error}


# ---- models and the float64 reference ----


@dataclass(frozen=True)
class VitDims:
    """A ViT for square images: the paper's (scripts/paper_vit.py) or a tiny one for checks and the dry run."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int = 32
    patch_size: int = 4

    def config(self, dropout: float = 0.1) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=3, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, num_labels=10,
        )  # fmt: skip


def make_vit(dims: VitDims, dropout: float = 0.1, seed: int = 0, zero_head: bool = True) -> ViTForImageClassification:
    """A freshly initialized ViT (seeded); `zero_head` zeroes the classifier as the paper does."""
    torch.manual_seed(seed)
    model = ViTForImageClassification(dims.config(dropout))
    if zero_head:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
    return model


def random_rows(dims: VitDims, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n rows of {"pixel_values", "labels"}: Gaussian images, random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dims.image_size, dims.image_size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


def stack_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def reference_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], gr_lambda: float, gr_r: float,
                    device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # fmt: skip
    """(GR gradient, plain gradient) in float64 from the definitions, by name: g1 = ∇L(θ), g2 = ∇L(θ + r·g1/‖g1‖),
    g = (1 − α)·g1 + α·g2 with α = λ/r. `model` is not modified (a float64 copy in eval mode: dropout off)."""
    m64 = copy.deepcopy(model).to(device=device, dtype=torch.float64).eval()
    params = {n: p.detach() for n, p in m64.named_parameters() if p.requires_grad}
    x = batch["pixel_values"].to(device=device, dtype=torch.float64)
    y = batch["labels"].to(device)

    def grad_at(values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        leaves = {n: v.clone().requires_grad_(True) for n, v in values.items()}
        logits = functional_call(m64, leaves, args=(), kwargs={"pixel_values": x}).logits
        return list(torch.autograd.grad(F.cross_entropy(logits, y), list(leaves.values()), allow_unused=True))

    g1 = [torch.zeros_like(p) if g is None else g for g, p in zip(grad_at(params), params.values())]
    norm = torch.sqrt(sum((g**2).sum() for g in g1))
    shifted = {n: p + (gr_r / norm) * g for (n, p), g in zip(params.items(), g1)}
    g2 = [torch.zeros_like(p) if g is None else g for g, p in zip(grad_at(shifted), params.values())]
    alpha = gr_lambda / gr_r
    names = list(params)
    gr = {n: ((1 - alpha) * a + alpha * b).cpu() for n, a, b in zip(names, g1, g2)}
    return gr, {n: a.cpu() for n, a in zip(names, g1)}


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all named tensors (float64); a name missing from `got` counts as zero."""
    num = sum(((got[n].double().cpu() - w) ** 2).sum() if n in got else (w**2).sum() for n, w in want.items())
    den = sum((w**2).sum() for w in want.values())
    return float(torch.sqrt(num / den))


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's `.grad` by name, gathered (FSDP2 DTensor shards) into float64 on the CPU."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = g.detach().to(device="cpu", dtype=torch.float64)
    return out


def param_copies(model: torch.nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


# ---- Trainer plumbing ----


class FixedBatchCollator:
    """Ignores the sampled indices and returns one batch that already lives on the device (timing runs)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return dict(self.batch)


class CaptureGrads(TrainerCallback):
    """Keeps `.grad` (gathered, float64) right before the optimizer step of step `step`: after clipping, so after
    the fp16 scaler unscaled it."""

    def __init__(self, step: int = 0) -> None:
        self.step, self.grads = step, None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == self.step:
            self.grads = full_grads(model)


class StepTimer(TrainerCallback):
    """Wall time of the optimizer steps after `warmup` (the device synchronized at both ends), the first step's
    time (compilation included), and the share of measured steps that were GR steps (`trainer` given)."""

    def __init__(self, warmup: int, trainer: Any = None) -> None:
        self.warmup, self.trainer = warmup, trainer
        self.t_begin = self.t0 = self.t1 = None
        self.first_step_s = None
        self.steps = 0
        self.gr_steps = 0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t_begin = self._now()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 1:
            self.first_step_s = self._now() - self.t_begin
        if state.global_step == self.warmup:
            self.t0 = self._now()
        elif state.global_step > self.warmup:
            self.steps += 1
            plan = getattr(self.trainer, "_gr_last_plan", None)
            self.gr_steps += int(plan is not None and plan.kind == "gr")
            self.t1 = self._now()

    @property
    def step_s(self) -> float | None:
        return (self.t1 - self.t0) / self.steps if self.steps and self.t0 is not None else None


class Deadline(TrainerCallback):
    """Stops training at the first step end after `deadline` (time.perf_counter)."""

    def __init__(self, deadline: float) -> None:
        self.deadline, self.stopped_at = deadline, None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if time.perf_counter() > self.deadline and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True


class EvalEachEpoch(TrainerCallback):
    """Test error after every epoch (on the device, in its own loop): the run's curve."""

    def __init__(self, data: ImageData, bf16: bool) -> None:
        self.data, self.bf16, self.curve, self.eval_s = data, bf16, [], 0.0

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        start = time.perf_counter()
        result = eval_error(model, self.data, self.bf16)
        self.eval_s += time.perf_counter() - start
        self.curve.append({"epoch": round(state.epoch, 3), **result})


def attach_cpu_scaler(trainer: Any, init_scale: float = 2.0**10) -> torch.amp.GradScaler:
    """fp16 on CPU: accelerate makes no GradScaler there (on CUDA it does). Turning native AMP on and attaching
    torch's CPU GradScaler runs the Trainer's own fp16 loop: float16 autocast, loss scaling, unscaling before
    clipping, skipped steps (tests/test_hardening.py uses it too)."""
    trainer.accelerator.native_amp = True
    scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return scaler


@contextlib.contextmanager
def count_host_syncs() -> Iterator[dict[str, int]]:
    """Counts Python-level calls of the Tensor methods that read a value back to the host (a sync on CUDA)."""
    counts = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_SYNCS}

    def counting(original: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts["n"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def finite_or_none(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits) if abs(value) >= 1e-3 else float(f"{value:.4g}")
