"""The report and figure of `scripts/compare.py`, from its JSON records and compact per-step histories.

Differences are always a − b paired by seed (the seeds both arms ran), with a 95 % t-interval and the paired
t-test's p (`compare_stats`); a claim is worded "lower"/"higher" only when p < 0.05.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import compare_stats as cs


def scale(key: str) -> float:
    """Error rates and accuracies are reported in percent."""
    return 100.0 if key.endswith(("error_rate", "accuracy")) else 1.0


def unit(key: str) -> str:
    return " (%)" if scale(key) == 100 else ""


def label(config: dict[str, Any], arm: str) -> str:
    return config.get("labels", {}).get(arm, arm)


def by_seed(runs: list[dict[str, Any]], arm: str, value: Any) -> dict[int, float]:
    """seed → value(run) for the arm's runs where it is defined."""
    out = {}
    for run in runs:
        if run["arm"] == arm:
            v = value(run)
            if v is not None and math.isfinite(v):
                out[run["seed"]] = v
    return out


def paired_metric(runs: list[dict[str, Any]], a: str, b: str, key: str) -> dict[str, Any]:
    """Paired statistics of a − b for the final metric `key` (in report units)."""
    return cs.paired(diffs(runs, a, b, key))


def window_mean(history: dict[str, Any], key: str, first: int, last: int) -> float | None:
    """The mean of `key` over the logged steps first..last (inclusive)."""
    if key not in history:
        return None
    values = [v for s, v in zip(*history[key]) if first <= s <= last and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def paired_window(histories: dict[str, Any], runs, a: str, b: str, key: str, window: list[int]) -> tuple:
    """Paired statistics of a − b of `key`'s window means, b's mean window value (the reference), and the paired
    statistics of the relative difference 100·(a − b)/b of the window means (%)."""
    seeds = sorted({r["seed"] for r in runs if r["arm"] == a} & {r["seed"] for r in runs if r["arm"] == b})
    diffs, base, relative = [], [], []
    for seed in seeds:
        ha, hb = histories.get(f"{a}-seed{seed}", {}), histories.get(f"{b}-seed{seed}", {})
        ma, mb = window_mean(ha, key, *window), window_mean(hb, key, *window)
        if ma is not None and mb is not None:
            diffs.append(ma - mb)
            base.append(mb)
            if mb:
                relative.append(100 * (ma - mb) / abs(mb))
    return cs.paired(diffs), (statistics.fmean(base) if base else math.nan), cs.paired(relative)


def _ms(values: list[float], spec: str) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{statistics.fmean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}–{max(values)}"


def _ci(stat: dict[str, Any], spec: str) -> str:
    if stat["n"] < 2:
        return "–"
    return f"[{stat['low']:{spec}}, {stat['high']:{spec}}]"


def arm_table(config: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    metrics = config["metrics"]
    head = ["arm", "n"] + [f"{m}{unit(m)}" for m in metrics]
    head += [f"best validation {config['curve']}{unit(config['curve'])} (step)", "train loss (last 10 %)",
             "steps", "GR step share", "forward-backward passes", "wall time (s)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    curve_scale = scale(config["curve"])
    for arm in config["arms"]:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            lines.append(f"| {label(config, arm)} | 0 |" + " – |" * (len(head) - 2))
            continue
        cells = [label(config, arm), str(len(rows))]
        cells += [_ms([scale(m) * r["metrics"][m] for r in rows if m in r["metrics"]], ".2f") for m in metrics]
        best = [r["best_validation"] for r in rows if r["best_validation"]["value"] is not None]
        steps = [b["step"] for b in best]
        cells.append(_ms([curve_scale * b["value"] for b in best], ".2f") + (f" ({_span(steps)})" if steps else ""))
        cells.append(_ms([r["train_loss_last10"] for r in rows if r["train_loss_last10"] is not None], ".3f"))
        cells.append(_ms([r["steps"] for r in rows], ".0f"))
        cells.append(_ms([r["gr_step_fraction"] for r in rows], ".2f"))
        cells.append(_ms([r["forward_backward_passes"] for r in rows], ".0f"))
        cells.append(_ms([r["wall_s"] for r in rows], ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def role(config: dict[str, Any], a: str, b: str, metric: str | None = None) -> str:
    """What a pre-registered study (`hypotheses`) planned a row to be: "primary (H…)" for a hypothesis's pair and
    primary metric, "secondary" for its pair and a `secondary` metric or a per-step window (metric None), else
    "exploratory"."""
    for h in config.get("hypotheses") or []:
        if list(h["pair"]) == [a, b]:
            if metric == config["metrics"][0]:
                return f"primary ({h['name']})"
            return "secondary" if metric is None or metric in (config.get("secondary") or []) else "exploratory"
    return "exploratory"


ROLES_TEXT = """
The last column is what the study's protocol planned each row to be: **primary**, a pre-registered hypothesis
(tested below, Holm-adjusted; its p here is unadjusted); **secondary**, a pre-registered secondary outcome, reported
with its unadjusted p and no claim beyond it; **exploratory**, everything the protocol did not plan (so are the
per-arm table, the validation curves, the wall times and the pass counts).
"""


def reads(config: dict[str, Any], a: str, b: str, metric: str, s: dict[str, Any]) -> str:
    """A row's reading by its p; a pre-registered hypothesis's row reads by its Holm p, in the tests below."""
    if role(config, a, b, metric).startswith("primary"):
        return "see the pre-registered tests below (Holm-adjusted)"
    return cs.claim(s)


def pair_table(config: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    roles = bool(config.get("hypotheses"))
    lines = ["| a − b | metric | n | mean | SE | 95 % CI | p | reads |" + (" role |" if roles else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if roles else "")]  # fmt: skip
    for a, b in config["pairs"]:
        for metric in config["metrics"]:
            s = paired_metric(runs, a, b, metric)
            if s["n"] == 0:
                continue
            p = f"{s['p']:.3g}" if s["n"] > 1 else "–"
            se = f"{s['se']:.2f}" if s["n"] > 1 else "–"
            lines.append(
                f"| {label(config, a)} − {label(config, b)} | {metric}{unit(metric)} | {s['n']} | {s['mean']:+.2f} "
                f"| {se} | {_ci(s, '+.2f')} | {p} | {reads(config, a, b, metric, s)} |"
                + (f" {role(config, a, b, metric)} |" if roles else "")
            )
    return "\n".join(lines)


def window_table(config: dict[str, Any], runs: list[dict[str, Any]], histories: dict[str, Any]) -> str:
    per_step = config.get("per_step") or {}
    roles = bool(config.get("hypotheses"))
    lines = [
        "| a − b | statistic | window (steps) | b's mean | a − b | 95 % CI | p | (a − b)/b, 95 % CI | reads |"
        + (" role |" if roles else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if roles else ""),
    ]
    for a, b in per_step.get("pairs", []):
        for key in per_step.get("keys", []):
            for name, window in (per_step.get("windows") or {}).items():
                s, base, rel = paired_window(histories, runs, a, b, key, window)
                if s["n"] == 0:
                    continue
                relative = f"{rel['mean']:+.1f} % {_ci(rel, '+.1f')}" if rel["n"] else "–"
                p = f"{s['p']:.3g}" if s["n"] > 1 else "–"
                lines.append(
                    f"| {label(config, a)} − {label(config, b)} | {key} | {name} ({window[0]}–{window[1]}) "
                    f"| {base:.4g} | {s['mean']:+.4g} | {_ci(s, '+.3g')} | {p} | {relative} | {cs.claim(s, '+.3g')} |"
                    + (f" {role(config, a, b)} |" if roles else "")
                )
    return "\n".join(lines)


def runs_table(config: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    metrics = config["metrics"]
    head = ["arm", "seed", *metrics, "train loss (last 10 %)", "GR step share", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    order = list(config["arms"])
    for r in sorted(runs, key=lambda r: (order.index(r["arm"]) if r["arm"] in order else 99, r["seed"])):
        cells = [label(config, r["arm"]), str(r["seed"])]
        cells += [f"{scale(m) * r['metrics'][m]:.2f}" if m in r["metrics"] else "–" for m in metrics]
        loss = r["train_loss_last10"]
        cells += [f"{loss:.3f}" if loss is not None else "–", f"{r['gr_step_fraction']:.2f}", f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_text(runs: list[dict[str, Any]]) -> str:
    """The runs' environment: what every run shares, once; for what differs between runs, its range (the load
    average) or how many values it took (each run's own is in the JSON)."""
    if not runs:
        return "No runs yet."
    lines, differing, load = [], [], ""
    for key in sorted({k for r in runs for k in r["environment"] if k != "commit"}):
        values = {str(r["environment"].get(key)) for r in runs}
        if len(values) == 1:
            lines.append(f"- {key}: {values.pop()}")
        elif key == "load_average_at_start":
            first = [r["environment"][key][0] for r in runs if r["environment"].get(key)]
            lines.append(f"- {key} (1 minute): {min(first):.2f}–{max(first):.2f}, each run's in the JSON")
            load = " but the load"
        else:
            differing.append(key)
            lines.append(f"- {key}: {len(values)} different values, each run's in the JSON")
    commits = sorted({r["environment"].get("commit", "") for r in runs})
    note = f"differing between runs: {', '.join(differing)}" if differing else f"the same for every run{load}"
    return "\n".join(lines) + f"\n\n({note}; code at commit(s) {', '.join(c[:10] for c in commits)}.)"


def determinism_text(data: dict[str, Any]) -> str:
    """The determinism check (one short run twice) and every re-run of a recorded cell (`--arms`, `--seeds`)."""
    check, lines = data.get("determinism"), []
    if check:
        verdict = "bitwise identical" if check["identical"] else "DIFFERENT"
        lines.append(
            f"{check['arm']} with seed {check['seed']}, {check['max_steps']} optimizer steps, run twice in this "
            f"environment: final weights {verdict} (model.safetensors sha256 {check['sha256'][0][:16]}… and "
            f"{check['sha256'][1][:16]}…)."
        )
    for again in data.get("rechecks", []):
        code = f"code at commit {str(again.get('commit'))[:10]}" + (", uncommitted changes" if again["dirty"] else "")
        verdict = (
            "identical to its record (the final metrics, timings aside, the step count and the weights' SHA-256)"
            if again["identical"]
            else "DIFFERENT from its record: " + "; ".join(again["differences"])
        )
        lines.append(f"Re-run of {again['arm']} seed {again['seed']} ({code}): {verdict}.")
    return "\n\n".join(lines) if lines else "Not checked."


FEW_SEEDS = 5  # below this many paired seeds the report and compare.py warn


def seeds_needed(effect: float, sd: float) -> int | None:
    """Seeds for 80 % power at p < 0.05 (two-sided paired t) to detect `effect` given the paired SD `sd`."""
    if not (effect > 0 and sd > 0 and math.isfinite(effect / sd)):
        return None
    try:
        return cs.seeds_for_power(effect, sd, cs.ALPHA)
    except ImportError:  # without scipy: the normal approximation, plus 2 for the t distribution's tails
        return math.ceil(((1.96 + 0.8416) * sd / effect) ** 2) + 2


def few_seeds(config: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """A sentence per pair whose primary metric has fewer than `FEW_SEEDS` paired seeds, with the seeds its
    observed spread would need to detect a difference as large as the observed one."""
    metric, notes = config["metrics"][0], []
    for a, b in config["pairs"]:
        s = paired_metric(runs, a, b, metric)
        if not 0 < s["n"] < FEW_SEEDS:
            continue
        need = seeds_needed(abs(s["mean"]), s["sd"]) if s["n"] > 1 else None
        spread = ""
        if need:
            spread = (f" With the observed spread (SD {s['sd']:.2f}), a difference as large as the observed "
                      f"{abs(s['mean']):.2f} needs about {need} seeds for 80 % power at p < 0.05.")  # fmt: skip
        notes.append(f"{label(config, a)} − {label(config, b)}: {s['n']} seed(s) are too few for a usable interval "
                     f"(5 or more).{spread}")  # fmt: skip
    return notes


def few_seeds_text(config: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    notes = few_seeds(config, runs)
    return "\n" + "\n".join(f"**Few seeds.** {note}" for note in notes) + "\n" if notes else ""


def hypotheses_text(config: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The pre-registered tests (`hypotheses` in the YAML): each pair's primary metric, two-sided paired t with
    Holm's adjustment over the hypotheses, and the exact sign-flip test as a sensitivity check."""
    hypotheses = config.get("hypotheses") or []
    if not hypotheses:
        return ""
    metric = config["metrics"][0]
    stats = [paired_metric(runs, *h["pair"], metric) for h in hypotheses]
    holm = cs.holm([s["p"] if s["n"] > 1 else 1.0 for s in stats])
    flips = [cs.holm([cs.sign_flip_p(diffs(runs, *h["pair"], metric)) if s["n"] > 1 else 1.0
                      for h, s in zip(hypotheses, stats)])][0]  # fmt: skip
    disagree: list[str] = []
    lines = ["| hypothesis | a − b | n | mean | 95 % CI | p | Holm p | sign-flip Holm p | reads |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for h, s, p_holm, p_flip in zip(hypotheses, stats, holm, flips):
        reads = "not enough seeds" if s["n"] < 2 else (
            f"{'lower' if s['mean'] < 0 else 'higher'} (Holm {cs.fmt_p(p_holm)})" if p_holm < cs.ALPHA
            else f"no evidence of a difference (95 % CI [{s['low']:+.2f}, {s['high']:+.2f}])")  # fmt: skip
        pair = f"{label(config, h['pair'][0])} − {label(config, h['pair'][1])}"
        lines.append(f"| {h['name']} | {pair} | {s['n']} | {s['mean']:+.2f} | {_ci(s, '+.2f')} | {s['p']:.3g} | "
                     f"{p_holm:.3g} | {p_flip:.3g} | {reads} |")  # fmt: skip
        if s["n"] > 1 and (p_holm < cs.ALPHA) != (p_flip < cs.ALPHA):
            disagree.append(f"**{h['name']}: the tests disagree.** The t-test's Holm p is {p_holm:.3g}, the sign-flip "
                            f"test's {p_flip:.3g}; only one of them is below {cs.ALPHA}.")  # fmt: skip
    agreement = ("\n" + "\n\n".join(disagree) + "\n" if disagree
                 else "\nThe sign-flip test agrees with the t-test on every hypothesis.\n"
                 if all(s["n"] > 1 for s in stats) else "")  # fmt: skip
    return f"""
### The pre-registered tests ({metric}{unit(metric)})

Two-sided paired t-tests, Holm-adjusted over the {len(hypotheses)} hypotheses; the exact sign-flip test
(Holm-adjusted too) as a sensitivity check. A hypothesis reads "lower"/"higher" only when its Holm p < 0.05.

{chr(10).join(lines)}
{agreement}"""


def diffs(runs: list[dict[str, Any]], a: str, b: str, key: str) -> list[float]:
    """The per-seed differences a − b of the final metric `key` (in report units), over the seeds both arms ran."""
    left = by_seed(runs, a, lambda r: r["metrics"].get(key))
    right = by_seed(runs, b, lambda r: r["metrics"].get(key))
    return [scale(key) * (left[s] - right[s]) for s in sorted(left.keys() & right.keys())]


def markdown(config: dict[str, Any], data: dict[str, Any], histories: dict[str, Any]) -> str:
    runs = data["runs"]
    total = len(config["arms"]) * len(config["seeds"])
    command = config.get("config_file", "<config.yaml>")
    arms = "\n".join(
        f"| {label(config, arm)} | `{arm}` | "
        + (", ".join(f"`{k}: {v}`" for k, v in overrides.items()) or "(the base)")
        + " |"
        for arm, overrides in config["arms"].items()
    )
    base = "\n".join(f"{k}: {v}" for k, v in config["base"].items())
    windows = ""
    if config.get("per_step", {}).get("pairs"):
        windows = f"""## Per-step statistics (a − b over windows of steps, paired by seed)

Each run's mean over the window, then the paired difference of the two arms' means (a − b, its 95 %
t-interval and p), and the same for the relative difference (a − b)/b of the window means, in percent.

{window_table(config, runs, histories)}

"""
    docs = f"{config.get('docs_dir', 'docs')}/{config['name']}"
    png = f"{config['name']}.png"
    return f"""# {config.get("title", config["name"])}

{config.get("description", "").strip()}

Runs recorded: {len(runs)} of {total} ({len(config["arms"])} arms × {len(config["seeds"])} seeds).

## Command

```bash
python scripts/compare.py {command}                 # runs what is missing (a finished run is not re-run)
python scripts/compare.py {command} --report_only   # this report and the figure, from {docs}.json and its histories
```

## Arms

| arm | name | overrides of the base |
|---|---|---|
{arms}

Base `train.py` arguments (`{{data}}` is the prepared-data folder under `{config["output_dir"]}`):

```yaml
{base}
```

Seeds: {", ".join(map(str, config["seeds"]))}. The seed sets the initial weights and the data order; runs of
different arms with the same seed are paired.

## Paired differences (a − b, same seed)

Mean, standard error and 95 % t-interval of the per-seed differences, and the paired t-test's p. A difference
is called "lower" or "higher" only when p < 0.05; otherwise there is no evidence of a difference, and the
interval says how large one could still be.

{pair_table(config, runs) if runs else "No runs yet."}
{ROLES_TEXT if config.get("hypotheses") else ""}{few_seeds_text(config, runs)}{hypotheses_text(config, runs)}
## Per arm (mean ± standard deviation over seeds)

{arm_table(config, runs) if runs else "No runs yet."}

"Best validation" is the lowest validation value during training and its step: the only selection this
comparison offers is on the validation set; every test metric is the final model's. A GR step costs two
forward-backward passes (1 + f with `gr_ascent_fraction` f, whose pass 1 sees a fraction f of the batch), a plain
step one. Wall time is per run, {config.get("pool") or "one per CPU"} runs at a
time on a shared machine, and includes start-up and the evaluations.

{windows}[![per-arm validation curves, paired differences and per-step differences]({png})]({png})

## Reproducibility

{determinism_text(data)}

Environment of the runs:

{environment_text(runs)}

## Every run

{runs_table(config, runs) if runs else "No runs yet."}
"""


def _band(ax, x, stats, color, name, alpha=0.2):
    mean = [s["mean"] for s in stats]
    low = [s["low"] if s["n"] > 1 else s["mean"] for s in stats]
    high = [s["high"] if s["n"] > 1 else s["mean"] for s in stats]
    ax.plot(x, mean, color=color, linewidth=1.0, label=name)
    ax.fill_between(x, low, high, color=color, alpha=alpha, linewidth=0)


def figure(config: dict[str, Any], data: dict[str, Any], histories: dict[str, Any], out: Path) -> None:
    """Per arm the mean validation curve with its 95 % band; per pair the paired difference of the primary metric
    with its 95 % interval; per per-step key the per-step paired difference of each per-step pair, relative to
    b's value at that step (so the start-up steps, where ψ is orders of magnitude larger, do not flatten the
    rest), with its 95 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    per_step = config.get("per_step") or {}
    step_pairs, step_keys = per_step.get("pairs", []), per_step.get("keys", [])
    step_panels = step_keys if step_pairs else []
    count = 2 + len(step_panels)
    cols = 3 if count > 4 else 2
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False)
    axes = list(axes.ravel())

    # 1: the validation curve per arm, mean and 95 % band over seeds (all seeds evaluate at the same steps).
    ax, curve = axes[0], config["curve"]
    for i, arm in enumerate(config["arms"]):
        series = [histories[f"{arm}-seed{r['seed']}"][curve] for r in runs
                  if r["arm"] == arm and curve in histories.get(f"{arm}-seed{r['seed']}", {})]  # fmt: skip
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s[0]) for s in series)))
        values = [[dict(zip(*s))[step] * scale(curve) for s in series] for step in steps]
        stats = [cs.paired(v) for v in values]
        _band(ax, steps, stats, f"C{i}", f"{label(config, arm)} (n={len(series)})", alpha=0.08)
    ax.set(xlabel="optimizer step", ylabel=f"validation {curve}{unit(curve)}", title="validation curve, 95 % band")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    # 2: the paired differences of the primary metric, with their 95 % intervals.
    ax, metric = axes[1], config["metrics"][0]
    names, stats = [], []
    for a, b in config["pairs"]:
        s = paired_metric(runs, a, b, metric)
        if s["n"] > 1:
            names.append(f"{label(config, a)} − {label(config, b)}")
            stats.append(s)
    ys = list(range(len(stats)))[::-1]
    for y, s in zip(ys, stats):
        color = "C3" if s["p"] < cs.ALPHA else "0.3"
        ax.errorbar(s["mean"], y, xerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]], fmt="o", color=color,
                    capsize=3)  # fmt: skip
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(ys, names, fontsize=7)
    extent = max([abs(s["low"]) for s in stats] + [abs(s["high"]) for s in stats] + [0.5])
    ax.set_xlim(-1.1 * extent, 1.1 * extent)
    ax.set(xlabel=f"a − b, final {metric}{unit(metric)}", title="paired difference, 95 % CI (red: p < 0.05)")
    ax.errorbar([], [], xerr=[], fmt="o", color="C3", label="p < 0.05")
    ax.errorbar([], [], xerr=[], fmt="o", color="0.3", label="no evidence (p ≥ 0.05)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x")

    # 3...: per key, the per-step paired difference of each pair relative to b (%), mean and 95 % band over seeds.
    for ax, key in zip(axes[2:], step_panels):
        means = [0.0]
        for i, (a, b) in enumerate(step_pairs):
            seeds = sorted({r["seed"] for r in runs if r["arm"] == a} & {r["seed"] for r in runs if r["arm"] == b})
            pairs = []
            for seed in seeds:
                ha, hb = histories.get(f"{a}-seed{seed}", {}), histories.get(f"{b}-seed{seed}", {})
                if key in ha and key in hb:
                    pairs.append((dict(zip(*ha[key])), dict(zip(*hb[key]))))
            if not pairs:
                continue
            steps = sorted(set.intersection(*(set(x) & set(y) for x, y in pairs)))
            # a step where a value was not measured (NaN, as ‖Δθ‖/lr at step 1) or the reference is 0 is left out
            steps = [s for s in steps if all(math.isfinite(x[s] - y[s]) and y[s] != 0 for x, y in pairs)]
            stats = [cs.paired([100 * (x[s] - y[s]) / abs(y[s]) for x, y in pairs]) for s in steps]
            name = f"{label(config, a)} − {label(config, b)} ({len(pairs)} seeds)"
            _band(ax, steps, stats, f"C{i}", name)
            means += [st["mean"] for st in stats if math.isfinite(st["mean"])]
        symlog = max(abs(m) for m in means) > 200  # Adam's first steps: ψ differs by orders of magnitude
        if symlog:
            ax.set_yscale("symlog", linthresh=10)
        margin = 3.0 if symlog else 1.3  # the means set the axis; a band wider than that is cut
        if min(means) < max(means):  # (not before a pair has a difference to show)
            ax.set_ylim(margin * min(means), margin * max(means))
        for i, (name, (first, last)) in enumerate((per_step.get("windows") or {}).items()):
            ax.axvspan(first, last, color=f"C{i + 4}", alpha=0.08, label=f"window {name}")
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set(xlabel="optimizer step", ylabel=f"(a − b) / b, {key} (%)", title=f"{key}: (a − b)/b, 95 % band")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[count:]:
        ax.set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write(config: dict[str, Any], data: dict[str, Any], histories: dict[str, Any], md: Path, png: Path) -> None:
    """Write the markdown report and the figure."""
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown(config, data, histories))
    figure(config, data, histories, png)
