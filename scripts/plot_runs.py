#!/usr/bin/env python
"""Plot GR runs side by side: eval error vs epoch, ‖g1‖ and the adaptive-LR variance vs step.

    python scripts/plot_runs.py RUN_DIR [RUN_DIR ...] --out fig.png

Each RUN_DIR is a training output directory holding `trainer_state.json` (and, when present, the model card
README.md that `GRTrainer` writes, whose `hf_gr` metadata names the run's GR warmup strategy). The GR
warmup span, read from the logged `gr_lambda`/`gr_r`, is shaded per run. Turn on `--gr_diagnostics_steps N`
in training for the last two panels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib
from huggingface_hub import ModelCard

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_run(run_dir: str) -> dict[str, Any]:
    """The run's log history, its label and its GR warmup span; a clear error when it is no training run."""
    path = Path(run_dir) / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no trainer_state.json: pass a training output directory.")
    history = json.loads(path.read_text())["log_history"]
    return {"label": run_label(Path(run_dir)), "history": history, "warmup_end": warmup_end(history)}


def run_label(run_dir: Path) -> str:
    """'plain' for λ = 0, else the GR warmup strategy, from the `hf_gr` block of the run's model card
    (`GRTrainer.create_model_card`); the directory name when there is no card."""
    card = run_dir / "README.md"
    if card.is_file():
        metadata = (ModelCard.load(card).data.to_dict() or {}).get("hf_gr") or {}
        if metadata.get("gr_lambda") == 0:
            return f"plain ({run_dir.name})"
        strategy = metadata.get("gr_warmup_strategy")
        if strategy in ("lambda", "r", "zero"):
            return f"GR, {strategy}-warmup ({run_dir.name})"
        if strategy == "none":
            return f"GR ({run_dir.name})"
    return run_dir.name


def warmup_end(history: list[dict[str, Any]]) -> int | None:
    """The last step whose logged λ or r is below its final value (None: no GR warmup in this run)."""
    entries = [e for e in history if "gr_lambda" in e]
    if not entries or entries[-1]["gr_lambda"] == 0:
        return None
    final = (entries[-1]["gr_lambda"], entries[-1]["gr_r"])
    below = [e["step"] for e in entries if e["gr_lambda"] < final[0] or e["gr_r"] < final[1]]
    return max(below) if below else None


def series(history: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    points = [(e[x], e[key]) for e in history if key in e and x in e]
    return [p[0] for p in points], [p[1] for p in points]


def eval_error(history: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Eval error (%) vs epoch, from `eval_error_rate` or `eval_accuracy`."""
    xs, ys = [], []
    for e in history:
        if "eval_error_rate" in e:
            xs.append(e["epoch"]), ys.append(100 * e["eval_error_rate"])
        elif "eval_accuracy" in e:
            xs.append(e["epoch"]), ys.append(100 * (1 - e["eval_accuracy"]))
    return xs, ys


def plot(runs: list[dict[str, Any]], out: str) -> None:
    """Three panels, one line per run, each run's GR warmup span shaded in its colour."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, run in enumerate(runs):
        colour = f"C{i}"
        history = run["history"]
        axes[0].plot(*eval_error(history), color=colour, label=run["label"], marker=".")
        axes[1].plot(*series(history, "gr_grad_norm"), color=colour, label=run["label"])
        axes[2].plot(*series(history, "adaptive_lr_var"), color=colour, label=run["label"])
        if run["warmup_end"] is not None:
            steps_per_epoch = _steps_per_epoch(history)
            for ax, scale in zip(axes, (1 / steps_per_epoch if steps_per_epoch else None, 1, 1)):
                if scale is not None:
                    ax.axvspan(0, run["warmup_end"] * scale, color=colour, alpha=0.08)
    axes[0].set(xlabel="epoch", ylabel="eval error (%)", title="Eval error")
    axes[1].set(xlabel="step", ylabel="‖∇L‖ (gr_grad_norm)", title="Gradient norm", yscale="log")
    axes[2].set(xlabel="step", ylabel="Var[lr / (√v̂ + ε)]", title="Adaptive-LR variance", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _steps_per_epoch(history: list[dict[str, Any]]) -> float | None:
    points = [(e["step"], e["epoch"]) for e in history if "epoch" in e and e.get("epoch")]
    return points[-1][0] / points[-1][1] if points else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="training output directories (with trainer_state.json)")
    parser.add_argument("--out", default="runs.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.run_dirs]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plot(runs, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
