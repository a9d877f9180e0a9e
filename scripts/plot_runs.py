#!/usr/bin/env python
"""Plot GR runs side by side: eval error vs epoch, ‖g1‖ and the adaptive-LR log-variance vs step.

    python scripts/plot_runs.py RUN_DIR [RUN_DIR ...] [--out fig.png]

Each RUN_DIR is a training output directory holding `trainer_state.json` (and, when present, the model card
README.md that `GRTrainer` writes, whose `hf_gr` metadata names the run's GR warmup strategy and its length W).
The GR warmup, steps 0 to W, is shaded per run (without a card, up to the last logged step whose λ or r is below
its final value). Turn on `--gr_diagnostics_steps N` in training for the last two panels. The figure goes to
`--out`, by default `runs.png` beside the first RUN_DIR.
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
    """The run's log history, its label and the end of its GR warmup; a clear error when it is no training run."""
    path = Path(run_dir) / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no trainer_state.json: pass a training output directory.")
    try:
        history = json.loads(path.read_text())["log_history"]
    except (ValueError, KeyError) as error:
        raise ValueError(f"{path} is not a Trainer state ({type(error).__name__}: {error}).") from error
    gr = card_metadata(Path(run_dir))
    end = warmup_steps(gr) if gr else warmup_end(history)
    return {"label": run_label(Path(run_dir), gr), "history": history, "warmup_end": end}


def card_metadata(run_dir: Path) -> dict[str, Any]:
    """The `hf_gr` block of the run's model card (`GRTrainer.create_model_card`); empty without a card."""
    card = run_dir / "README.md"
    if not card.is_file():
        return {}
    return (ModelCard.load(card).data.to_dict() or {}).get("hf_gr") or {}


def run_label(run_dir: Path, gr: dict[str, Any]) -> str:
    """'plain' for λ = 0, else the GR warmup strategy; the directory name when there is no card."""
    if gr.get("gr_lambda") == 0:
        return f"plain ({run_dir.name})"
    strategy = gr.get("gr_warmup_strategy")
    if strategy in ("lambda", "r", "zero"):
        return f"GR, {strategy}-warmup ({run_dir.name})"
    if strategy == "none":
        return f"GR ({run_dir.name})"
    return run_dir.name


def warmup_steps(gr: dict[str, Any]) -> int | None:
    """W from the card, when the run relaxed GR during a warmup (None: plain training or no warmup)."""
    if gr.get("gr_lambda") == 0 or gr.get("gr_warmup_strategy") not in ("lambda", "r", "zero"):
        return None
    return gr.get("gr_warmup_steps") or None


def warmup_end(history: list[dict[str, Any]]) -> int | None:
    """Without a card: the last logged step whose λ or r is below its final value (None: no GR warmup)."""
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


NO_DATA = {
    "eval": "no eval results: run with --eval_strategy epoch",
    "diagnostics": "no diagnostics: run with --gr_diagnostics_steps N",
}


def figure(runs: list[dict[str, Any]]) -> plt.Figure:
    """Three panels, one line per run, each run's GR warmup (steps 0 to W) shaded in its colour."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, run in enumerate(runs):
        colour = f"C{i}"
        history = run["history"]
        axes[0].plot(*eval_error(history), color=colour, label=run["label"], marker=".")
        axes[1].plot(*series(history, "gr_grad_norm"), color=colour, label=run["label"])
        axes[2].plot(*series(history, "adaptive_lr_log_var"), color=colour, label=run["label"])
        if run["warmup_end"] is not None:
            steps_per_epoch = _steps_per_epoch(history)
            for ax, scale in zip(axes, (1 / steps_per_epoch if steps_per_epoch else None, 1, 1)):
                if scale is not None:
                    ax.axvspan(0, run["warmup_end"] * scale, color=colour, alpha=0.08)
    axes[0].set(xlabel="epoch", ylabel="eval error (%)", title="Eval error")
    axes[1].set(xlabel="step", ylabel="‖∇L‖ (gr_grad_norm)", title="Gradient norm")
    axes[2].set(xlabel="step", ylabel="Var[ln 1/(√v̂ + ε)], active coordinates", title="Adaptive-LR log-variance")
    for ax, kind in zip(axes, ("eval", "diagnostics", "diagnostics")):
        ax.grid(alpha=0.3)
        if not any(len(line.get_xdata()) for line in ax.get_lines()):
            ax.text(0.5, 0.5, NO_DATA[kind], transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.set_yticks([])
        elif ax is axes[1]:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(runs: list[dict[str, Any]], out: str) -> None:
    """Write `figure(runs)` to the PNG `out`."""
    fig = figure(runs)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _steps_per_epoch(history: list[dict[str, Any]]) -> float | None:
    points = [(e["step"], e["epoch"]) for e in history if "epoch" in e and e.get("epoch")]
    return points[-1][0] / points[-1][1] if points else None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="training output directories (with trainer_state.json)")
    parser.add_argument("--out", help="the PNG to write (default: runs.png beside the first run directory)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.run_dirs]
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or str(Path(args.run_dirs[0]).resolve().parent / "runs.png")
    plot(runs, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
