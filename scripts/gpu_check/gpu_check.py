"""One prepared device check of hf_gr: correctness on CUDA, throughput, and a short CIFAR-10 reproduction.

    bash scripts/gpu_check.sh                                     # on the GPU machine: runs this file
    python scripts/gpu_check/gpu_check.py --dry-run --out DIR     # the same code on CPU, tiny sizes, < 1 min
    python scripts/gpu_check/gpu_check.py --prepare-data outputs/gpu_data --source CIFAR10_PARQUET_DIR
                                                                  # decode the CIFAR-10 subset the check reads

Writes DIR/gpu_check.json (after every section, so a run cut short keeps what finished) and DIR/gpu_check.log.

1. correctness (gpu_check_correctness.py): the GR gradient against float64 in fp32, bf16 and fp16 (the Trainer's
   own GradScaler), dropout masks replayed on the device RNG, a non-finite fp16 step skipped, no host
   sync inside a GR step, one FSDP2 GR step (world size 1, its own process), norms over gradients on two devices.
2. throughput: images/s of plain training, GR (α = 1), gr_probability 0.5, gr_interval 4, gr_interval 4 +
   gr_reuse, sub-batch ascent (gr_ascent_fraction 0.25) alone and with gr_probability 0.5, one-pass SAM
   (gr_ascent_direction previous_step), for the paper's ViT-S and ViT-B at batch 256 in bf16, the cost of each
   over plain, peak memory.
3. reproduction: the paper's ViT-Ti on the carried CIFAR-10 subset (uint8 on the GPU, flip + reflect-pad-4 crop
   on the GPU): plain AdamW, GR, GR + zero-warmup, as many epochs as fit the time left; test error per run.
4. compile: plain and GR ViT-S throughput with torch.compile, in its own process (bounded by the time left).

The time budget (--budget-s) bounds the whole run: the reproduction takes what the other sections leave.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent  # scripts/gpu_check: this check's modules
SCRIPTS = HERE.parent  # scripts/: the recipe's paper_vit
REPO = SCRIPTS.parent
for _path in (str(HERE), str(SCRIPTS), str(REPO)):  # run as a file on the GPU machine: hf_gr from the working tree
    if _path not in sys.path:
        sys.path.insert(0, _path)

from transformers import Trainer  # noqa: E402

from hf_gr import GRTrainer, GRTrainingArguments  # noqa: E402

import gpu_check_correctness as correctness  # noqa: E402
from gpu_check_lib import (  # noqa: E402
    DATA_FILE,
    AugmentingCollator,
    Deadline,
    EvalEachEpoch,
    FixedBatchCollator,
    IndexDataset,
    StepTimer,
    VitDims,
    eval_error,
    finite_or_none,
    free_device_memory,
    load_data,
    make_vit,
    prepare_data,
    synthetic_data,
)
from paper_vit import PAPER_VIT_CONFIGS  # noqa: E402

log = logging.getLogger("gpu_check")
DEFAULT_DATA = REPO / "outputs" / "gpu_data" / DATA_FILE
SECTIONS = ("correctness", "throughput", "reproduction", "compile")
CORRECTNESS_CHECKS = ("fp32", "bf16", "fp16", "dropout_replay", "skipped_step", "host_sync",
                      "previous_step_host_sync", "fsdp2", "multi_device_norm")  # fmt: skip
GR_MODES: dict[str, dict[str, Any] | None] = {  # None: the stock Trainer
    "plain": None,
    "gr": {},
    "gr_p0.5": {"gr_probability": 0.5},
    "gr_k4": {"gr_interval": 4},
    "gr_k4_reuse": {"gr_interval": 4, "gr_reuse": True},
    "gr_ascent25": {"gr_ascent_fraction": 0.25},
    "gr_ascent25_p0.5": {"gr_ascent_fraction": 0.25, "gr_probability": 0.5},
    "gr_previous": {"gr_ascent_direction": "previous_step"},  # one-pass SAM
}
REPRO_RUNS = {
    "plain": {"gr_lambda": 0.0},
    "gr": {"gr_warmup_strategy": "none"},
    "gr_zero_warmup": {"gr_warmup_strategy": "zero"},
}
REPRO_WARMUP_FRACTION = 40 / 300  # the paper's 40 of 300 epochs
REPRO_RUN_KEYS = ("eval_error", "eval_error_exact_rows", "epochs_done", "steps", "gr_warmup_steps",
                  "stopped_early_at_step", "train_s", "eval_s", "images_per_s", "final_train_loss")  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    check_dims: VitDims
    check_batch: int
    bench_models: dict[str, VitDims]
    bench_batch: int
    bench_warmup: int
    bench_steps: int
    repro_dims: VitDims
    repro_batch: int
    repro_rows: tuple[int | None, int | None]  # (train, test) rows of the data file; None: all
    max_epochs: int
    compile_model: str = "vit-s"


GPU_SIZES = Sizes(
    check_dims=VitDims(64, 2, 4, 128), check_batch=64,
    bench_models={name: VitDims(**PAPER_VIT_CONFIGS[name]) for name in ("vit-s", "vit-b")},
    bench_batch=256, bench_warmup=3, bench_steps=12,  # 12 steps: three whole gr_interval-4 cycles
    repro_dims=VitDims(**PAPER_VIT_CONFIGS["vit-ti"]), repro_batch=256, repro_rows=(None, None), max_epochs=100,
)  # fmt: skip
DRY_SIZES = Sizes(
    check_dims=VitDims(32, 2, 2, 64, image_size=16), check_batch=16,
    bench_models={"vit-s": VitDims(32, 1, 2, 64, image_size=16), "vit-b": VitDims(48, 1, 2, 96, image_size=16)},
    bench_batch=8, bench_warmup=1, bench_steps=4,
    repro_dims=VitDims(32, 1, 2, 64, patch_size=8), repro_batch=32, repro_rows=(256, 128), max_epochs=2,
)  # fmt: skip


@dataclass
class Context:
    """What every section needs: the device, the sizes, the clock, the output and the results so far."""

    out: Path
    dry_run: bool
    budget_s: float
    data_path: Path
    start: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)
    tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="gpu_check_"))

    def __post_init__(self) -> None:
        self.cuda = torch.cuda.is_available() and not self.dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.sizes = DRY_SIZES if self.dry_run else GPU_SIZES

    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def training_args(self, **overrides: Any) -> GRTrainingArguments:
        """Quiet arguments on this device: no saving, no reporting, no per-step host reads of the loss."""
        values = dict(
            output_dir=self.tmp, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=not self.cuda,
            seed=0, dataloader_pin_memory=False, logging_nan_inf_filter=False, logging_steps=10**6,
            gr_warmup_strategy="none",
        )  # fmt: skip
        values.update(overrides)
        return GRTrainingArguments(**values)

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(path)


def skeleton(ctx: Context) -> dict[str, Any]:
    """Every key the JSON has, before any section fills it in (the dry run writes the same keys)."""
    no_cuda = None if ctx.cuda else "skipped: no CUDA"
    empty_mode = dict.fromkeys(("images_per_s", "step_ms", "cost_vs_plain", "peak_memory_mib", "gr_step_fraction",
                                "first_step_s"))  # fmt: skip
    return {
        "meta": meta(ctx),
        "correctness": {"passed": None, **{name: {"passed": None} for name in CORRECTNESS_CHECKS}},
        "throughput": {
            "batch_size": ctx.sizes.bench_batch,
            "precision": "bf16" if ctx.cuda else "fp32",
            "models": {
                name: {
                    "dims": vars(dims),
                    "modes": {m: dict(empty_mode) for m in GR_MODES},
                    "peak_memory_gr_over_plain": None,
                }
                for name, dims in ctx.sizes.bench_models.items()
            },
        },
        "reproduction": {
            "data": None,
            "epochs": None,
            "steps_per_epoch": None,
            "calibration": None,
            "runs": {name: {**dict.fromkeys(REPRO_RUN_KEYS), "curve": []} for name in REPRO_RUNS},
        },
        "compile": {
            "status": no_cuda or ("skipped: dry run" if ctx.dry_run else None),
            "model": "vit-s",
            "modes": {"plain": dict(empty_mode), "gr": dict(empty_mode)},
        },
    }


def meta(ctx: Context) -> dict[str, Any]:
    import accelerate
    import transformers

    return {
        "dry_run": ctx.dry_run, "device": torch.cuda.get_device_name(0) if ctx.cuda else "cpu",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if ctx.cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "accelerate": accelerate.__version__, "python": platform.python_version(), "budget_s": ctx.budget_s,
        "elapsed_s": 0.0, "sections": {},
    }  # fmt: skip


# ---- 1. correctness ----


def run_correctness(ctx: Context) -> None:
    section = ctx.results["correctness"]
    checks = {
        "fp32": lambda: correctness.gr_vs_float64(ctx, "fp32"),
        "bf16": lambda: correctness.gr_vs_float64(ctx, "bf16"),
        "fp16": lambda: correctness.gr_vs_float64(ctx, "fp16"),
        "dropout_replay": lambda: correctness.dropout_replay(ctx),
        "skipped_step": lambda: correctness.skipped_step(ctx),
        "host_sync": lambda: correctness.host_sync(ctx),
        "previous_step_host_sync": lambda: correctness.previous_step_host_sync(ctx),
        "fsdp2": lambda: run_worker(ctx, "fsdp2", timeout_s=120.0 if ctx.cuda else 90.0),
        "multi_device_norm": lambda: correctness.multi_device_norm(ctx),
    }
    for name, check in checks.items():
        section[name] = guarded(name, check)
        log.info("correctness %s: %s", name, json.dumps(section[name], default=str))
        free_device_memory()
        ctx.save()
    outcomes = [section[name].get("passed") for name in CORRECTNESS_CHECKS]
    section["passed"] = all(o is not False for o in outcomes) and any(o is True for o in outcomes)


def guarded(name: str, check: Any) -> dict[str, Any]:
    """Run one check; an exception becomes the check's error string (the run goes on)."""
    try:
        return check()
    except Exception as error:
        log.error("%s failed:\n%s", name, traceback.format_exc())
        return {"passed": False, "error": f"{type(error).__name__}: {str(error)[:500]}"}


def run_worker(ctx: Context, worker: str, timeout_s: float) -> dict[str, Any]:
    """`gpu_check.py --worker NAME` in its own process (FSDP2: under torch.distributed.run); its JSON result."""
    out = Path(ctx.tmp) / f"{worker}.json"
    out.unlink(missing_ok=True)
    launcher = [sys.executable]
    if worker == "fsdp2":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command = launcher + [str(HERE / "gpu_check.py"), "--worker", worker, "--worker-out", str(out),
                          "--out", str(ctx.out), "--budget-s", str(int(timeout_s))]  # fmt: skip
    if ctx.dry_run:
        command.append("--dry-run")
    paths = [str(REPO), str(HERE), str(SCRIPTS), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
        error = None if proc.returncode == 0 else f"exit {proc.returncode}: {_tail(proc.stderr)}"
    except subprocess.TimeoutExpired as expired:
        error = f"timed out after {timeout_s:.0f} s: {_tail(expired.stderr)}"
    result = json.loads(out.read_text()) if out.exists() else {"passed": False}
    if error:
        result.setdefault("error", error)
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def _tail(text: str | bytes | None, lines: int = 6) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " | ".join((text or "").strip().splitlines()[-lines:])[-800:]


# ---- 2. throughput ----


def timed_training(ctx: Context, model: torch.nn.Module, gr: dict[str, Any] | None, dataset: Any, collator: Any,
                   warmup: int, steps: int, **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Train `warmup + steps` optimizer steps through the Trainer (stock when `gr` is None, else GRTrainer with
    λ = r = 0.1 plus `gr`) and time the last `steps`."""
    batch_size = overrides.pop("per_device_train_batch_size")
    args = ctx.training_args(
        max_steps=warmup + steps, per_device_train_batch_size=batch_size, bf16=ctx.cuda, learning_rate=1e-3,
        weight_decay=0.3, max_grad_norm=5.0, lr_scheduler_type="constant",
        optim="adamw_torch_fused" if ctx.cuda else "adamw_torch", **{"gr_lambda": 0.1, "gr_r": 0.1, **(gr or {})},
        **overrides,
    )  # fmt: skip
    trainer_class = Trainer if gr is None else GRTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator)
    timer = StepTimer(warmup, trainer)
    trainer.add_callback(timer)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step_s = timer.step_s
    result = {
        "images_per_s": finite_or_none(batch_size / step_s, 1) if step_s else None,
        "step_ms": finite_or_none(1000 * step_s, 2) if step_s else None,
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if ctx.cuda else None,
        "gr_step_fraction": round(timer.gr_steps / timer.steps, 3) if gr is not None and timer.steps else None,
        "first_step_s": finite_or_none(timer.first_step_s, 2),
    }
    del trainer
    free_device_memory()
    return result


def bench_mode(ctx: Context, dims: VitDims, mode: str, **overrides: Any) -> dict[str, Any]:
    """One throughput configuration on a fixed random batch that lives on the device."""
    sizes = ctx.sizes
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(sizes.bench_batch, 3, dims.image_size, dims.image_size, generator=g),
             "labels": torch.randint(0, 10, (sizes.bench_batch,), generator=g)}  # fmt: skip
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    steps = sizes.bench_warmup + sizes.bench_steps
    return timed_training(
        ctx, make_vit(dims), GR_MODES[mode], IndexDataset(steps * sizes.bench_batch), FixedBatchCollator(batch),
        sizes.bench_warmup, sizes.bench_steps, per_device_train_batch_size=sizes.bench_batch, **overrides,
    )  # fmt: skip


def add_ratios(modes: dict[str, dict[str, Any]]) -> None:
    plain = modes["plain"].get("images_per_s")
    for result in modes.values():
        ips = result.get("images_per_s")
        result["cost_vs_plain"] = round(plain / ips, 3) if plain and ips else None


def run_throughput(ctx: Context, limit_s: float) -> None:
    section = ctx.results["throughput"]["models"]
    stop_at = time.perf_counter() + limit_s
    for name, dims in ctx.sizes.bench_models.items():
        modes = section[name]["modes"]
        for mode in GR_MODES:
            if time.perf_counter() > stop_at:
                modes[mode]["status"] = "skipped: time budget"
                continue
            modes[mode].update(guarded(f"throughput {name} {mode}", functools.partial(bench_mode, ctx, dims, mode)))
            log.info("throughput %s %s: %s", name, mode, modes[mode])
        add_ratios(modes)
        plain, gr = modes["plain"].get("peak_memory_mib"), modes["gr"].get("peak_memory_mib")
        section[name]["peak_memory_gr_over_plain"] = round(gr / plain, 3) if plain and gr else None
        ctx.save()


def compile_worker(ctx: Context, out_path: Path) -> None:
    """Plain and GR throughput of `compile_model` with torch.compile (the Trainer's `torch_compile`); written after
    each mode, so a timeout keeps the first."""
    name = ctx.sizes.compile_model
    result: dict[str, Any] = {"status": "running", "model": name, "modes": {}}
    for mode in ("plain", "gr"):
        backend = {"torch_compile_backend": "eager"} if ctx.dry_run else {}
        bench = functools.partial(bench_mode, ctx, ctx.sizes.bench_models[name], mode, torch_compile=True, **backend)
        result["modes"][mode] = guarded(f"compile {mode}", bench)
        out_path.write_text(json.dumps(result, default=str))
    add_ratios(result["modes"])
    failed = [m for m, r in result["modes"].items() if r.get("error")]
    result["status"] = f"failed: {', '.join(failed)}" if failed else "ok"
    out_path.write_text(json.dumps(result, default=str))


# ---- 3. reproduction ----


def repro_data(ctx: Context) -> Any:
    n_train, n_test = ctx.sizes.repro_rows
    if ctx.data_path.exists():
        data = load_data(ctx.data_path, n_train, n_test)
    elif ctx.dry_run:
        data = synthetic_data(n_train, n_test)
    else:
        raise FileNotFoundError(f"{ctx.data_path} is missing: run --prepare-data here and carry outputs/gpu_data")
    return data.to(ctx.device)


def calibrate(ctx: Context, data: Any) -> dict[str, float]:
    """Seconds per optimizer step (plain, GR) with the real input pipeline, a Trainer's set-up, one evaluation."""
    sizes, out = ctx.sizes, {}
    for name, gr in (("plain", {"gr_lambda": 0.0}), ("gr", {})):
        started = time.perf_counter()
        warmup, steps = (2, 6) if ctx.cuda else (1, 2)
        timed = timed_training(ctx, make_vit(sizes.repro_dims), gr, IndexDataset(len(data.train_y)),
                               AugmentingCollator(data.train_x, data.train_y), warmup, steps,
                               per_device_train_batch_size=sizes.repro_batch, dataloader_drop_last=True)  # fmt: skip
        out[f"{name}_step_s"] = sizes.repro_batch / timed["images_per_s"]
        out["setup_s"] = max(0.0, time.perf_counter() - started - (warmup + steps) * out[f"{name}_step_s"])
    started = time.perf_counter()
    eval_error(make_vit(sizes.repro_dims).to(ctx.device), data, bf16=ctx.cuda)
    out["eval_s"] = time.perf_counter() - started
    return {k: round(v, 4) for k, v in out.items()}


def plan_epochs(ctx: Context, cal: dict[str, float], steps_per_epoch: int, budget_s: float) -> int:
    """As many epochs as the three runs fit in `budget_s` (zero-warmup: plain steps for the warmup fraction)."""
    f = REPRO_WARMUP_FRACTION
    step_sum = cal["plain_step_s"] + cal["gr_step_s"] + f * cal["plain_step_s"] + (1 - f) * cal["gr_step_s"]
    per_epoch = steps_per_epoch * step_sum + 3 * cal["eval_s"]
    epochs = math.floor((budget_s - 3 * cal["setup_s"]) / per_epoch)
    return max(1, min(ctx.sizes.max_epochs, epochs))


def train_repro_run(ctx: Context, data: Any, gr: dict[str, Any], epochs: int, deadline: float) -> dict[str, Any]:
    sizes = ctx.sizes
    steps = epochs * (len(data.train_y) // sizes.repro_batch)
    evaluation, stop = EvalEachEpoch(data, bf16=ctx.cuda), Deadline(deadline)
    args = ctx.training_args(
        per_device_train_batch_size=sizes.repro_batch, num_train_epochs=epochs, learning_rate=1e-3,
        weight_decay=0.3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, lr_scheduler_type="cosine",
        warmup_steps=round(REPRO_WARMUP_FRACTION * steps), max_grad_norm=5.0, bf16=ctx.cuda,
        optim="adamw_torch_fused" if ctx.cuda else "adamw_torch", dataloader_drop_last=True, logging_strategy="epoch",
        **{"gr_lambda": 0.1, "gr_r": 0.1, **gr},
    )  # fmt: skip
    trainer = GRTrainer(
        model=make_vit(sizes.repro_dims), args=args, train_dataset=IndexDataset(len(data.train_y)),
        data_collator=AugmentingCollator(data.train_x, data.train_y), callbacks=[evaluation, stop],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    compute_s = max(train_s - evaluation.eval_s, 1e-9)
    final = evaluation.curve[-1] if evaluation.curve else eval_error(trainer.model, data, bf16=ctx.cuda)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        **{k: final[k] for k in ("eval_error", "eval_error_exact_rows")},
        "epochs_done": round(trainer.state.epoch or 0, 3), "steps": trainer.state.global_step,
        "gr_warmup_steps": trainer.gr_warmup_length(), "stopped_early_at_step": stop.stopped_at,
        "train_s": round(train_s, 1), "eval_s": round(evaluation.eval_s, 1),
        "images_per_s": round(trainer.state.global_step * sizes.repro_batch / compute_s, 1),
        "final_train_loss": finite_or_none(losses[-1]) if losses else None, "curve": evaluation.curve,
    }  # fmt: skip
    del trainer
    free_device_memory()
    return result


def run_reproduction(ctx: Context, budget_s: float) -> None:
    section = ctx.results["reproduction"]
    end = time.perf_counter() + budget_s
    data = repro_data(ctx)
    section["data"] = {
        "source": data.source, "train": len(data.train_y), "test": len(data.test_y),
        "test_exact_rows": int(data.test_exact.sum()), "model_dims": vars(ctx.sizes.repro_dims),
    }  # fmt: skip
    cal = calibrate(ctx, data)
    steps_per_epoch = len(data.train_y) // ctx.sizes.repro_batch
    epochs = plan_epochs(ctx, cal, steps_per_epoch, end - time.perf_counter())
    section.update(calibration=cal, epochs=epochs, steps_per_epoch=steps_per_epoch)
    ctx.save()
    f = REPRO_WARMUP_FRACTION
    step_s = {"plain": cal["plain_step_s"], "gr": cal["gr_step_s"],
              "gr_zero_warmup": f * cal["plain_step_s"] + (1 - f) * cal["gr_step_s"]}  # fmt: skip
    estimate = {n: cal["setup_s"] + epochs * (steps_per_epoch * s + cal["eval_s"]) for n, s in step_s.items()}
    names = list(REPRO_RUNS)
    for i, name in enumerate(names):
        later = sum(estimate[n] for n in names[i + 1 :])
        deadline = min(time.perf_counter() + 1.25 * estimate[name], end - later)
        run = functools.partial(train_repro_run, ctx, data, REPRO_RUNS[name], epochs, deadline)
        section["runs"][name].update(guarded(f"reproduction {name}", run))
        log.info("reproduction %s: error %s %%", name, section["runs"][name].get("eval_error"))
        ctx.save()


# ---- the run ----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code in under a minute")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"the carried subset (default {DEFAULT_DATA})")
    parser.add_argument("--budget-s", type=float, help="time budget of the whole run (default 440; dry run 170)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--prepare-data", type=Path, metavar="DIR", help="decode the CIFAR-10 subset into DIR, exit")
    parser.add_argument("--source", type=Path, help="--prepare-data: the CIFAR-10 parquet folder (train, test)")
    parser.add_argument("--n-train", type=int, default=20_000, help="--prepare-data: training images (balanced)")
    parser.add_argument("--n-test", type=int, default=5_000, help="--prepare-data: test rows from row 0")
    parser.add_argument("--worker", choices=("fsdp2", "compile"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None and args.prepare_data is None:
        parser.error("--out is required (or --prepare-data DIR)")
    if args.prepare_data is not None and args.source is None:
        parser.error("--prepare-data needs --source: the CIFAR-10 parquet folder (train.parquet, test.parquet)")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def setup_logging(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    log.handlers.clear()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(out / "gpu_check.log")):
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)


def run_sections(ctx: Context, sections: list[str]) -> None:
    """The sections in order; each gets a share of the time left, the reproduction what the others leave."""
    plan = {
        "correctness": lambda: run_correctness(ctx),
        "throughput": lambda: run_throughput(ctx, limit_s=0.3 * ctx.remaining()),
        "reproduction": lambda: run_reproduction(
            ctx, min(240.0, ctx.remaining() - (75.0 if "compile" in sections and ctx.cuda else 10.0))),
        "compile": lambda: run_compile(ctx),
    }  # fmt: skip
    for name in sections:
        started = time.perf_counter()
        log.info("== %s (%.0f s left)", name, ctx.remaining())
        try:
            plan[name]()
            status = "done"
        except Exception as error:
            log.error("section %s failed:\n%s", name, traceback.format_exc())
            status = f"error: {type(error).__name__}: {str(error)[:500]}"
        ctx.results["meta"]["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - started, 1)}
        ctx.save()


def run_compile(ctx: Context) -> None:
    if not ctx.cuda:
        return  # the skeleton says why
    left = ctx.remaining() - 10
    if left < 45:
        ctx.results["compile"]["status"] = f"skipped: time budget ({left:.0f} s left)"
        return
    result = run_worker(ctx, "compile", timeout_s=left)
    section = ctx.results["compile"]
    for mode, values in result.get("modes", {}).items():
        section["modes"][mode].update(values)
    section["status"] = f"failed: {result['error']}" if result.get("error") else result.get("status", "failed")
    section["process_s"] = result["process_s"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_data is not None:
        info = prepare_data(args.prepare_data, args.source, args.n_train, args.n_test)
        print(json.dumps(info))
        return 0
    budget = args.budget_s if args.budget_s is not None else (170.0 if args.dry_run else 440.0)
    ctx = Context(out=args.out, dry_run=args.dry_run, budget_s=budget, data_path=args.data)
    if args.worker is not None:
        worker = correctness.fsdp2_worker if args.worker == "fsdp2" else compile_worker
        try:
            worker(ctx, args.worker_out)
        finally:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
        return 0
    setup_logging(args.out)
    if not ctx.cuda and not ctx.dry_run:
        log.warning("no CUDA device: running the dry-run sizes on CPU")
        ctx.dry_run, ctx.sizes = True, DRY_SIZES
    passed = None
    try:
        ctx.results = skeleton(ctx)
        ctx.save()
        run_sections(ctx, [s for s in SECTIONS if s in args.sections.split(",")])
        ctx.save()
        passed = ctx.results["correctness"]["passed"]
        log.info("done in %.0f s; correctness passed: %s", time.perf_counter() - ctx.start, passed)
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
    return 0 if passed is not False else 1


if __name__ == "__main__":
    sys.exit(main())
