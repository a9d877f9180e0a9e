#!/usr/bin/env python
"""CPU-scale study of the paper's mechanism: plain AdamW, GR, and GR with λ-, r- and zero-warmup.

    python scripts/study_warmup.py --out_dir runs/study --figure docs/study-cpu.png

A small from-scratch ViT (patch 4, 32×32) on a subset of ../shared/data/cifar10 (train rows; evaluation on the
1,000 pixel-exact test rows 0–999), AdamW with linear LR warmup and cosine decay. Every run has the same seed,
data subset and data order; only the GR settings differ. Each run is `scripts/train.py` in its own process.
`--sweep_r 0.05,0.1,0.2` first runs plain GR (α = 1) briefly at each r. Prints a markdown table and writes
`study.json` and the figure (scripts/plot_runs.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"

RUNS = {  # name → GR flags (α = λ/r = 1 throughout)
    "plain": ["--gr_lambda", "0"],
    "gr": ["--gr_warmup_strategy", "none"],
    "lambda-warmup": ["--gr_warmup_strategy", "lambda"],
    "r-warmup": ["--gr_warmup_strategy", "r"],
    "zero-warmup": ["--gr_warmup_strategy", "zero"],
}


def train_command(args: argparse.Namespace, output_dir: Path, epochs: float, gr_r: float, extra: list[str]) -> list:
    """The `scripts/train.py` command line of one run."""
    steps_per_epoch = math.ceil(args.train_rows / args.batch_size)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    return [
        sys.executable, str(REPO / "scripts" / "train.py"),
        "--train_file", str(CIFAR / "train.parquet"), "--validation_file", str(CIFAR / "test.parquet"),
        "--max_train_samples", str(args.train_rows), "--max_eval_samples", "1000",
        "--model_config", "vit-ti", "--config_overrides", args.model,
        "--output_dir", str(output_dir),
        "--optim", "adamw_torch", "--learning_rate", str(args.learning_rate), "--weight_decay", "0.3",
        "--lr_scheduler_type", "cosine", "--warmup_steps", str(warmup_steps), "--max_grad_norm", "5.0",
        "--num_train_epochs", str(epochs), "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", "500", "--eval_strategy", "epoch", "--save_strategy", "no",
        "--logging_steps", str(args.diagnostics_steps), "--gr_diagnostics_steps", str(args.diagnostics_steps),
        "--gr_lambda", str(gr_r), "--gr_r", str(gr_r), "--seed", "0", "--use_cpu", "true",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--do_train", "true", "--do_eval", "true",
        *extra,
    ]  # fmt: skip


def run(command: list[str], log: Path) -> float:
    """Run one training process (its output to `log`); the wall time in seconds."""
    start = time.perf_counter()
    # One torch thread unless told otherwise: on 2 shared cores, 2 OpenMP threads run ~15x slower (spin-waits).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    return time.perf_counter() - start


def summarize(run_dir: Path, warmup_steps: int, wall_s: float) -> dict[str, Any]:
    """Final and best eval error, and ‖g1‖ / adaptive-LR variance at the diagnostic step closest to the warmup end."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    errors = [100 * e["eval_error_rate"] for e in history if "eval_error_rate" in e]
    if not errors:
        errors = [100 * (1 - e["eval_accuracy"]) for e in history if "eval_accuracy" in e]
    diagnostics = [e for e in history if "adaptive_lr_var" in e]
    at_warmup = min(diagnostics, key=lambda e: abs(e["step"] - warmup_steps)) if diagnostics else {}
    return {
        "final_error": errors[-1] if errors else None,
        "best_error": min(errors) if errors else None,
        "grad_norm_at_warmup_end": at_warmup.get("gr_grad_norm"),
        "adaptive_lr_var_at_warmup_end": at_warmup.get("adaptive_lr_var"),
        "step_at_warmup_end": at_warmup.get("step"),
        "wall_s": wall_s,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| run | final eval error (%) | best eval error (%) | ‖g1‖ at warmup end | adaptive-LR var at warmup end "
        "| wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {_fmt(r['final_error'], '.2f')} | {_fmt(r['best_error'], '.2f')} "
            f"| {_fmt(r['grad_norm_at_warmup_end'], '.3f')} | {_fmt(r['adaptive_lr_var_at_warmup_end'], '.3e')} "
            f"| {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def trajectory(out: Path, names: list[str], key: str, steps: tuple[int, ...]) -> str:
    """A markdown table of one logged diagnostic at the given steps, one row per run."""
    lines = [f"| run | {' | '.join(f'step {s}' for s in steps)} |", "|---|" + "---|" * len(steps)]
    for name in names:
        history = json.loads((out / name / "trainer_state.json").read_text())["log_history"]
        values = {e["step"]: e[key] for e in history if key in e}
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(s), ".3g") for s in steps) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="runs/study")
    parser.add_argument("--figure", default="docs/study-cpu.png")
    parser.add_argument("--train_rows", type=int, default=5000)
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--warmup_epochs", type=float, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument(
        "--gr_r", type=float, default=None, help="r (= λ, α = 1) of the GR runs (default: the sweep's best, else 0.1)"
    )
    parser.add_argument("--diagnostics_steps", type=int, default=8)
    parser.add_argument(
        "--model",
        default="hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128",
        help="ViTConfig overrides of the from-scratch ViT-Ti (patch 4, 32×32 stay)",
    )
    parser.add_argument("--runs", default=",".join(RUNS), help="which of: " + ", ".join(RUNS))
    parser.add_argument("--sweep_r", default="", help="comma-separated r values for a short GR sweep first")
    parser.add_argument("--sweep_epochs", type=float, default=5)
    parser.add_argument("--report_only", action="store_true", help="re-print the tables and figure of --out_dir")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if args.report_only:
        return report(out, json.loads((out / "study.json").read_text()), args.figure)
    if not (CIFAR / "train.parquet").is_file():
        print(f"error: {CIFAR} not found (the study needs ../shared/data/cifar10)", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    warmup_steps = round(args.warmup_epochs * math.ceil(args.train_rows / args.batch_size))
    results: dict[str, Any] = {"settings": vars(args), "warmup_steps": warmup_steps, "sweep": {}, "runs": {}}

    for r in [float(v) for v in args.sweep_r.split(",") if v]:
        run_dir = out / f"sweep-r{r:g}"
        cmd = train_command(args, run_dir, args.sweep_epochs, r, RUNS["gr"])
        results["sweep"][f"r={r:g}"] = summarize(run_dir, warmup_steps, run(cmd, out / f"sweep-r{r:g}.log"))
        print(f"sweep r={r:g}: {results['sweep'][f'r={r:g}']}", flush=True)

    gr_r = args.gr_r
    if gr_r is None:
        swept = {float(k[2:]): v["final_error"] for k, v in results["sweep"].items()}
        gr_r = min(swept, key=swept.get) if swept else 0.1
    results["gr_r"] = gr_r
    for name in args.runs.split(","):
        run_dir = out / name
        cmd = train_command(args, run_dir, args.epochs, gr_r, RUNS[name])
        results["runs"][name] = summarize(run_dir, warmup_steps, run(cmd, out / f"{name}.log"))
        print(f"{name}: {results['runs'][name]}", flush=True)

    (out / "study.json").write_text(json.dumps(results, indent=2))
    return report(out, results, args.figure)


def report(out: Path, results: dict[str, Any], figure: str) -> int:
    """Print the sweep and main tables and the diagnostics' trajectories, and draw the figure."""
    if results["sweep"]:
        print("\nr sweep (plain GR, α = 1, short runs):\n" + table(results["sweep"]))
    print(f"\nmain runs: r = λ = {results['gr_r']:g}, GR warmup W = {results['warmup_steps']} steps")
    print("\n" + table(results["runs"]))
    names = list(results["runs"])
    steps = (8, 40, 80, 120, 160, 240, 400, 800)
    for key in ("gr_grad_norm", "adaptive_lr_var", "adaptive_lr_mean", "gr_cosine"):
        print(f"\n{key}:\n" + trajectory(out, names, key, steps))
    runs = [str(out / n) for n in names]
    subprocess.run([sys.executable, str(REPO / "scripts" / "plot_runs.py"), *runs, "--out", figure], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
