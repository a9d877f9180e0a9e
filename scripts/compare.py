#!/usr/bin/env python
"""A/B comparison of `scripts/train.py` configurations: arms × seeds, paired by seed, with honest statistics.

    python scripts/compare.py configs/study/cpu.yaml                      # runs what is missing, then reports
    python scripts/compare.py configs/study/cpu.yaml --data_source PATH   # the data found elsewhere
    python scripts/compare.py configs/study/cpu.yaml --report_only        # the report and figure, from the repo
    python scripts/compare.py configs/study/cpu.yaml --arms plain --seeds 0   # one cell: run it, or re-run it and
                                                                          # check it against its record bit for bit

The YAML names a base `train.py` configuration (a mapping, or the path of a train.py YAML), the arms (name →
overrides of the base), the seeds, the pool size and the pairs of arms to compare. Each run is `train.py` in its
own process (one torch thread on CPU, one GPU each on GPUs), a pool of them at a time (by default one per CPU, or
per GPU). A run that finished is never re-run: the study resumes where it stopped.

Optionally the YAML's `data` section prepares disjoint row ranges of parquet files (written once under the
output folder, which git ignores) that the base configuration refers to as `{data}/<name>.parquet`; `--test_files`
sets are evaluated once, after training. Nothing is selected on a test set: only the validation set is seen
during training.

Outputs (in `docs_dir`): `<name>.json` (one record per run, each with its environment), `<name>.md` (the
paired differences with their 95 % t-intervals and t-test p, costs, per-step windows), `<name>.png` and
`<name>-histories.json.gz` (the per-step logs the report and figure need, so `--report_only` works from the repo).
With `--commit` each finished run's record and history are committed to git as it finishes, so a study that spans
several sessions resumes from what is committed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
CONFIG_KEYS = {
    "name": "outputs are <docs_dir>/<name>.json, .md, .png and <name>-histories.json.gz",
    "title": "the report's title",
    "description": "markdown set in the report after the title (the question, the regime and why)",
    "output_dir": "run folders and prepared data (git-ignored), relative to the repository",
    "docs_dir": "where the outputs go, relative to the repository",
    "data": "{source: folder, splits: {name: [file, first_row, end_row]}}: prepared parquet subsets",
    "base": "train.py arguments: a mapping, or the path of a train.py YAML",
    "arms": "name → train.py overrides of the base",
    "labels": "name → how the report names an arm",
    "seeds": "the seeds every arm runs with",
    "pool": "runs at a time (default: one per CPU, or per GPU)",
    "threads": "torch threads per run on CPU (default 1)",
    "metrics": "the final metrics compared, the first the primary (e.g. test_error_rate)",
    "pairs": "[a, b] pairs: the report gives a − b paired by seed",
    "hypotheses": "[{name, pair: [a, b]}]: pre-registered tests of the primary metric, Holm-adjusted over the list",
    "secondary": "with hypotheses: the metrics pre-registered as secondary outcomes of the hypotheses' pairs",
    "curve": "the validation metric drawn against the step (default eval_error_rate)",
    "per_step": "{keys: [...], pairs: [[a, b]], windows: {label: [first, last]}, every_after: n}",
    "determinism": "{arm, seed, max_steps}: run that arm twice and compare the final weights bit for bit",
}
RUN_OPTIONS = ("only_arms", "only_seeds", "commit")  # set from the command line, not part of the YAML
HISTORY_KEYS = ("loss", "eval_loss", "gr_step_fraction", "gr_reuse_fraction")


_SAY = threading.Lock()


def say(message: str) -> None:
    """One whole progress line (runs finish in parallel threads: their lines must not run into each other)."""
    with _SAY:
        sys.stdout.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        sys.stdout.flush()


class ConfigError(ValueError):
    """A bad comparison YAML: one message naming the key and what it allows."""


# ---- the comparison's configuration ----


def load_config(path: Path, data_source: str | None = None) -> dict[str, Any]:
    """The comparison YAML, checked, with defaults filled in and the base arguments resolved to a mapping."""
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a mapping with the keys {', '.join(CONFIG_KEYS)}.")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}.")
    for key in ("name", "base", "arms", "seeds", "metrics"):
        if key not in config:
            raise ConfigError(f"{path}: '{key}' is required ({CONFIG_KEYS[key]}).")
    arms = config["arms"]
    if not isinstance(arms, dict) or not arms or not all(isinstance(v or {}, dict) for v in arms.values()):
        raise ConfigError(f"{path}: 'arms' must map each arm's name to a mapping of train.py overrides.")
    config["arms"] = {str(k): dict(v or {}) for k, v in arms.items()}
    seeds = config["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) for s in seeds)
        or len(set(seeds)) < len(seeds)
    ):
        raise ConfigError(f"{path}: 'seeds' must be a list of distinct integers, got {seeds!r}.")
    if isinstance(config["base"], str):
        config["base"] = yaml.safe_load((REPO / config["base"]).read_text()) or {}
    if not isinstance(config["base"], dict):
        raise ConfigError(f"{path}: 'base' must be a mapping of train.py arguments or the path of a train.py YAML.")
    pairs = [list(p) for p in config.get("pairs", [])]
    step_pairs = [list(p) for p in (config.get("per_step") or {}).get("pairs", [])]
    hypotheses = config.get("hypotheses") or []
    if not all(isinstance(h, dict) and {"name", "pair"} <= set(h) for h in hypotheses):
        raise ConfigError(f"{path}: 'hypotheses' must list {{name, pair: [a, b]}} mappings.")
    for pair in pairs + step_pairs + [list(h["pair"]) for h in hypotheses]:
        if len(pair) != 2 or not set(pair) <= set(arms):
            raise ConfigError(f"{path}: pair {pair!r} must name two arms of: {', '.join(arms)}.")
    if not isinstance(config["metrics"], list) or not config["metrics"]:
        raise ConfigError(f"{path}: 'metrics' must list the final metrics to compare, e.g. [test_error_rate].")
    secondary = config.get("secondary") or []
    if not (isinstance(secondary, list) and all(isinstance(m, str) for m in secondary)
            and set(secondary) <= set(config["metrics"][1:]) and (hypotheses or not secondary)):  # fmt: skip
        raise ConfigError(f"{path}: 'secondary' must list metrics of 'metrics' after the first, with 'hypotheses'; "
                          f"got {secondary!r}.")  # fmt: skip
    determinism = config.get("determinism")
    if determinism is not None and determinism.get("arm") not in arms:
        raise ConfigError(
            f"{path}: determinism.arm must be one of: {', '.join(arms)}; got {determinism.get('arm')!r}."
        )
    config.update(pairs=pairs, output_dir=config.get("output_dir", f"runs/{config['name']}"), config_file=str(path))
    config.setdefault("docs_dir", "docs")
    config.setdefault("labels", {})
    config.setdefault("curve", "eval_error_rate")
    config.setdefault("threads", 1)
    config.setdefault("per_step", {})
    if data_source is not None:
        config.setdefault("data", {})["source"] = data_source
    return config


def run_args(config: dict[str, Any], arm: str, seed: int) -> dict[str, Any]:
    """The train.py arguments of one run: the base, the arm's overrides, the seed and the run folder, with
    `{data}` replaced by the prepared-data folder."""
    data_dir = f"{config['output_dir']}/data"

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{data}", data_dir)
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    args = {**config["base"], **config["arms"][arm]}
    args = {key: fill(value) for key, value in args.items()}
    args.update(seed=seed, output_dir=str(run_dir(config, arm, seed)))
    return args


def run_dir(config: dict[str, Any], arm: str, seed: int) -> Path:
    return Path(config["output_dir"]) / f"{arm}-seed{seed}"


# ---- data ----


def prepare_data(config: dict[str, Any]) -> None:
    """Write the `data.splits` row ranges of the source parquet files to `<output_dir>/data/<name>.parquet`
    (once: an existing file made from the same spec is kept). Ranges taken from the same file must not overlap."""
    data = config.get("data")
    if not data:
        return
    import pyarrow.parquet as pq

    source = REPO / str(data.get("source", ""))
    splits = data.get("splits") or {}
    taken: dict[str, list[tuple[int, int, str]]] = {}
    for name, spec in splits.items():
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[1], int) and isinstance(spec[2], int)):
            raise ConfigError(f"data.splits.{name} must be [file, first_row, end_row], got {spec!r}.")
        file, first, end = spec
        for other_first, other_end, other in taken.get(file, []):
            if first < other_end and other_first < end:
                raise ConfigError(f"data.splits.{name} rows {first}–{end} of {file} overlap {other}'s.")
        taken.setdefault(file, []).append((first, end, name))
    out = Path(config["output_dir"]) / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name, (file, first, end) in splits.items():
        target, stamp = out / f"{name}.parquet", out / f"{name}.json"
        spec = {"file": file, "first": first, "end": end}
        if target.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec:
            continue
        path = source / file
        if not path.is_file():
            raise ConfigError(f"data: {path} not found; pass the data folder with --data_source.")
        table = pq.read_table(path)
        if end > table.num_rows or first < 0 or first >= end:
            raise ConfigError(f"data.splits.{name}: rows {first}–{end} outside {file}'s {table.num_rows} rows.")
        pq.write_table(table.slice(first, end - first), target)
        stamp.write_text(json.dumps(spec))


# ---- the environment ----


PACKAGES = ("torch", "transformers", "accelerate", "datasets", "evaluate", "huggingface-hub", "safetensors",
            "numpy", "pyarrow", "pillow", "scikit-learn", "pyyaml", "scipy")


def environment(config: dict[str, Any]) -> dict[str, Any]:
    """What a run's numbers depend on besides its arguments: every package version, the data files' SHA-256, the
    CPU, threads, the device, and the git commit with whether the tree had uncommitted changes."""
    from importlib import metadata

    import torch

    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpus = gpu_count(config)
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": packages["transformers"],
        "accelerate": packages["accelerate"],
        "packages": packages,
        "data_sha256": data_digests(config),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": config["threads"] if not gpus else None,
        "device": torch.cuda.get_device_name(0) if gpus else "cpu",
        "commit": git("rev-parse", "HEAD"),
        # tracked files changed and not committed (run folders and study records are not code)
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "hf_gr", "scripts", "configs")),
    }


def data_digests(config: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each source file the `data.splits` read (the prepared subsets are slices of these)."""
    data = config.get("data") or {}
    source = REPO / str(data.get("source", ""))
    digests = {}
    for file in sorted({spec[0] for spec in (data.get("splits") or {}).values()}):
        digest = hashlib.sha256()
        with (source / file).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests[file] = digest.hexdigest()
    return digests


def gpu_count(config: dict[str, Any]) -> int:
    """GPUs the runs use (0 when the base says use_cpu or there is none)."""
    if str(config["base"].get("use_cpu", False)).lower() in ("true", "1"):
        return 0
    import torch

    return torch.cuda.device_count()


# ---- one run ----


def finished(path: Path) -> bool:
    """A run folder holds a finished run once compare.py wrote its `compare_run.json` (after train.py exited 0)."""
    return (path / "compare_run.json").is_file()


def train(config: dict[str, Any], arm: str, seed: int, gpu: int | None, extra: dict[str, Any] | None = None) -> float:
    """Run train.py for one arm and seed (its output in `<run folder>.log`); the wall time in seconds."""
    args = {**run_args(config, arm, seed), **(extra or {})}
    path = REPO / args["output_dir"]
    shutil.rmtree(path, ignore_errors=True)  # a run killed midway starts over
    path.mkdir(parents=True)
    (path / "compare_args.yaml").write_text(yaml.safe_dump(args, sort_keys=False))
    # This checkout's hf_gr first (an editable install may point at another checkout).
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if gpu is None:
        env.update(OMP_NUM_THREADS=str(config["threads"]), MKL_NUM_THREADS=str(config["threads"]))
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    command = [sys.executable, str(TRAIN), str(path / "compare_args.yaml")]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    with path.with_suffix(".log").open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall_s = time.perf_counter() - start
    meta = {"wall_s": wall_s, "load_average_at_start": load, "args": args}
    (path / "compare_run.json").write_text(json.dumps(meta, indent=1))
    return wall_s


def history_of(path: Path, config: dict[str, Any]) -> dict[str, list[list[float]]]:
    """The run's log, compact: key → [steps, values] for the curve, the losses, the GR step share and the
    per-step keys (every step up to the last window, then every `per_step.every_after`-th)."""
    log = json.loads((path / "trainer_state.json").read_text())["log_history"]
    per_step = config["per_step"]
    keys = [config["curve"], *HISTORY_KEYS, *per_step.get("keys", [])]
    last = max((w[1] for w in (per_step.get("windows") or {}).values()), default=math.inf)
    every = int(per_step.get("every_after", 1))
    out: dict[str, list[list[float]]] = {}
    for key in dict.fromkeys(keys):
        steps, values = [], []
        for entry in log:
            if key in entry and "step" in entry and isinstance(entry[key], (int, float)):
                step = entry["step"]
                if key in per_step.get("keys", []) and step > last and step % every:
                    continue
                steps.append(step)
                values.append(float(f"{entry[key]:.6g}"))
        if steps:
            out[key] = [steps, values]
    return out


def record(
    config: dict[str, Any], arm: str, seed: int, env: dict[str, Any], folder: Path | None = None
) -> dict[str, Any]:
    """The JSON record of a finished run: its arguments, final metrics, validation summary, cost, environment."""
    path = REPO / (folder or run_dir(config, arm, seed))
    meta = json.loads((path / "compare_run.json").read_text())
    state = json.loads((path / "trainer_state.json").read_text())
    results = json.loads((path / "all_results.json").read_text())
    log = state["log_history"]
    share = gr_step_share(log)
    steps = state["global_step"]
    accumulation = int(meta["args"].get("gradient_accumulation_steps", 1))
    curve = [(e["step"], e[config["curve"]]) for e in log if config["curve"] in e]
    losses = [(e["step"], e["loss"]) for e in log if "loss" in e]
    tail = [loss for step, loss in losses if step > 0.9 * steps] or [loss for _, loss in losses[-1:]]
    best = min(curve, key=lambda c: c[1]) if curve else (None, None)
    return {
        "arm": arm,
        "seed": seed,
        "metrics": {k: v for k, v in results.items() if isinstance(v, (int, float))},
        "best_validation": {"step": best[0], "value": best[1]},  # the selection a user may make, on validation
        "train_loss_last10": statistics.fmean(tail) if tail else None,
        "steps": steps,
        "gr_step_fraction": share,
        "forward_backward_passes": passes(meta["args"], steps, accumulation, share),
        "wall_s": meta["wall_s"],
        "train_runtime": results.get("train_runtime"),
        "model_sha256": weights_digest(path) if (path / "model.safetensors").is_file() else None,
        "args": meta["args"],
        "environment": {**env, "load_average_at_start": meta.get("load_average_at_start")},
    }


def gr_step_share(log: list[dict[str, Any]]) -> float:
    """The share of optimizer steps that were GR (two-pass) steps, from the logged `gr_step_fraction` (each log
    entry covers the steps since the previous one)."""
    total, previous, steps = 0.0, 0, 0
    for entry in (e for e in log if "gr_step_fraction" in e):
        span = entry["step"] - previous
        total += span * entry["gr_step_fraction"]
        previous, steps = entry["step"], steps + span
    return total / steps if steps else 0.0


def passes(args: dict[str, Any], steps: int, accumulation: int, share: float) -> int:
    """Forward-backward passes over whole micro-batches: one per plain step; a GR step adds its pass 1 on a fraction
    f of the batch (`gr_ascent_fraction`, 1 by default), or, with `gr_ascent_direction: previous_step`, nothing
    once a D exists (one pass more for a first GR step without one, when GR runs from the first step; the two-pass
    steps a λ-warmup's α_t < 1 takes are not counted)."""
    if args.get("gr_ascent_direction") == "previous_step":
        first = accumulation if share > 0 and args.get("gr_warmup_strategy", "zero") == "none" else 0
        return steps * accumulation + first
    return round(steps * accumulation * (1 + share * ascent_fraction(args)))


def ascent_fraction(args: dict[str, Any]) -> float:
    """f, the share of each batch that a GR step's pass 1 runs on (`gr_ascent_fraction`, 1 when not set)."""
    value = args.get("gr_ascent_fraction")
    return 1.0 if value is None else float(value)


def weights_digest(path: Path) -> str:
    """sha256 of a run's saved weights (model.safetensors)."""
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


# ---- the study ----


class Study:
    """The JSON (one record per finished run) and the compact histories, rewritten atomically as runs finish."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        docs = REPO / config["docs_dir"]
        self.json_path = docs / f"{config['name']}.json"
        self.histories_path = docs / f"{config['name']}-histories.json.gz"
        self.lock = threading.Lock()
        stored_config = {k: v for k, v in config.items() if k not in RUN_OPTIONS}  # how it ran is not the study
        self.data: dict[str, Any] = {"config": stored_config, "runs": [], "determinism": None}
        self.histories: dict[str, Any] = {}
        if self.json_path.is_file():
            stored = json.loads(self.json_path.read_text())
            self.data["runs"] = stored.get("runs", [])
            self.data["determinism"] = stored.get("determinism")
        if self.histories_path.is_file():
            self.histories = json.loads(gzip.decompress(self.histories_path.read_bytes()))
        for run in self.data["runs"]:
            expected = run_args(config, run["arm"], run["seed"])
            if run["args"] != expected:
                changed = sorted(k for k in {*expected, *run["args"]} if expected.get(k) != run["args"].get(k))
                raise ConfigError(
                    f"{self.json_path} holds {run['arm']} seed {run['seed']} run with other arguments "
                    f"({', '.join(changed)}); resume with the same configuration or use another name."
                )

    def has(self, arm: str, seed: int) -> bool:
        return any(r["arm"] == arm and r["seed"] == seed for r in self.data["runs"])

    def record_of(self, arm: str, seed: int) -> dict[str, Any] | None:
        return next((r for r in self.data["runs"] if r["arm"] == arm and r["seed"] == seed), None)

    def add(self, entry: dict[str, Any], history: dict[str, Any]) -> None:
        with self.lock:
            self.data["runs"].append(entry)
            self.histories[f"{entry['arm']}-seed{entry['seed']}"] = history
            self.save()
            if self.config.get("commit"):
                self.commit(f"{self.config['name']}: {entry['arm']} seed {entry['seed']}")

    def commit(self, message: str) -> None:
        """Commit the record and the histories alone (nothing else staged is taken), so a later session resumes."""
        paths = [str(p.resolve()) for p in (self.json_path, self.histories_path)]
        for command in (["git", "add", "--", *paths], ["git", "commit", "-q", "-m", message, "--", *paths]):
            done = subprocess.run(command, cwd=self.json_path.parent, capture_output=True, text=True)
            if done.returncode:
                say(f"not committed ({' '.join(command[:2])}): {done.stderr.strip()}")
                return

    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.json_path)
        tmp = self.histories_path.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(json.dumps(self.histories, separators=(",", ":")).encode(), mtime=0))
        tmp.replace(self.histories_path)

    def report(self) -> None:
        with self.lock:
            data, histories = json.loads(json.dumps(self.data)), dict(self.histories)
        docs = REPO / self.config["docs_dir"]
        compare_report.write(self.config, data, histories, docs / f"{self.config['name']}.md",
                             docs / f"{self.config['name']}.png")  # fmt: skip


def cells(config: dict[str, Any]) -> list[tuple[str, int]]:
    """The (arm, seed) cells, seed by seed (so an interrupted study has whole seeds), limited to `--arms` and
    `--seeds` when given."""
    arms, seeds = config.get("only_arms") or list(config["arms"]), config.get("only_seeds") or config["seeds"]
    return [(a, s) for s in seeds for a in arms]


def pending(config: dict[str, Any], study: Study) -> list[tuple[str, int]]:
    """The (arm, seed) runs not recorded yet."""
    return [(a, s) for a, s in cells(config) if not study.has(a, s)]


TIMING = ("_runtime", "_per_second")


def recheck(config: dict[str, Any], study: Study, env: dict[str, Any], arm: str, seed: int) -> list[str]:
    """Re-run a recorded cell in `<output_dir>/rerun/` and compare it with its record: every final metric but the
    timings, the step count and the weights' SHA-256 must be equal bit for bit. Returns the differences."""
    stored = study.record_of(arm, seed)
    folder = Path(config["output_dir"]) / "rerun" / f"{arm}-seed{seed}"
    say(f"re-run {arm} seed {seed} to check it against its record")
    train(config, arm, seed, 0 if gpu_count(config) else None, {"output_dir": str(folder)})
    fresh = record(config, arm, seed, env, folder)
    differences = []
    for key in sorted({*stored["metrics"], *fresh["metrics"]}):
        if key.endswith(TIMING):
            continue
        if stored["metrics"].get(key) != fresh["metrics"].get(key):
            differences.append(f"{key}: recorded {stored['metrics'].get(key)!r}, now {fresh['metrics'].get(key)!r}")
    for key in ("steps", "model_sha256"):
        if stored.get(key) is not None and stored.get(key) != fresh.get(key):
            differences.append(f"{key}: recorded {stored.get(key)!r}, now {fresh.get(key)!r}")
    return differences


def run_one(config: dict[str, Any], study: Study, env: dict[str, Any], arm: str, seed: int, slots: Queue) -> None:
    """Train (unless the folder holds the finished run already), then record one run."""
    path = REPO / run_dir(config, arm, seed)
    if not finished(path):
        gpu = slots.get()
        try:
            say(f"start {arm} seed {seed}")
            train(config, arm, seed, gpu)
        finally:
            slots.put(gpu)
    entry = record(config, arm, seed, env)
    study.add(entry, history_of(path, config))
    # A pre-registered study (`hypotheses`) shows its validation curve's last value, not a test metric, as it goes.
    metric = config["curve"] if config.get("hypotheses") else config["metrics"][0]
    say(f"done {arm} seed {seed}: {metric} {entry['metrics'].get(metric, math.nan):.4f}, {entry['wall_s']:.0f} s")


def check_determinism(config: dict[str, Any], study: Study) -> None:
    """Run `determinism.arm` with `determinism.seed` for `max_steps` steps twice and record whether the final
    weights are bitwise identical (once: a recorded check is kept)."""
    spec = config.get("determinism")
    if not spec or study.data.get("determinism"):
        return
    arm, seed, steps = spec["arm"], int(spec.get("seed", config["seeds"][0])), int(spec.get("max_steps", 20))
    folders = [Path(config["output_dir"]) / "determinism" / attempt for attempt in ("a", "b")]
    gpu = 0 if gpu_count(config) else None
    say(f"determinism check: {arm} seed {seed}, {steps} steps, twice side by side")

    def attempt(folder: Path) -> float:
        extra = {"max_steps": steps, "output_dir": str(folder), "test_files": None, "eval_strategy": "no"}
        return train(config, arm, seed, gpu, extra)

    with ThreadPoolExecutor(max_workers=2) as executor:
        walls = list(executor.map(attempt, folders))
    digests = [weights_digest(REPO / folder) for folder in folders]
    study.data["determinism"] = {
        "arm": arm, "seed": seed, "max_steps": steps, "sha256": digests, "identical": digests[0] == digests[1],
        "wall_s": walls,
    }  # fmt: skip
    study.save()


def run_study(config: dict[str, Any], pool: int | None) -> list[str]:
    """Prepare the data, check determinism, run every pending run `pool` at a time, report after each; returns
    the failures (a failed run stays pending for the next invocation)."""
    prepare_data(config)
    study = Study(config)
    env = environment(config)
    check_determinism(config, study)
    gpus = gpu_count(config)
    size = pool or config.get("pool") or gpus or len(os.sched_getaffinity(0))
    slots: Queue = Queue()
    for slot in range(size):
        slots.put(slot % gpus if gpus else None)
    failures: list[str] = []
    if config.get("only_arms") or config.get("only_seeds"):
        for arm, seed in cells(config):
            if study.has(arm, seed):
                differences = recheck(config, study, env, arm, seed)
                for difference in differences:
                    failures.append(f"{arm} seed {seed} differs from its record: {difference}")
                if not differences:
                    say(f"{arm} seed {seed}: identical to its record (metrics, steps, weights)")
                study.data.setdefault("rechecks", []).append(
                    {"arm": arm, "seed": seed, "identical": not differences, "differences": differences,
                     "commit": env.get("commit"), "dirty": env.get("dirty")}
                )  # fmt: skip
                study.save()
    todo = pending(config, study)
    say(f"{len(todo)} runs to do, {len(study.data['runs'])} recorded; {size} at a time")

    def job(arm: str, seed: int) -> None:
        try:
            run_one(config, study, env, arm, seed, slots)
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the others
            failures.append(f"{arm} seed {seed}: {error!r}")
            say(f"FAILED {arm} seed {seed}: {error!r}")
            return
        try:
            study.report()
        except Exception as error:  # noqa: BLE001 - the report is a by-product; the runs matter
            say(f"report not updated: {error!r}")

    with ThreadPoolExecutor(max_workers=size) as executor:
        for arm, seed in todo:
            executor.submit(job, arm, seed)
    study.report()
    return failures


def report_only(config: dict[str, Any]) -> None:
    """Rebuild the report and figure from the JSON and the committed histories; refuse, naming what is missing."""
    study = Study.__new__(Study)
    study.config, study.lock = config, threading.Lock()
    docs = REPO / config["docs_dir"]
    study.json_path = docs / f"{config['name']}.json"
    study.histories_path = docs / f"{config['name']}-histories.json.gz"
    if not study.json_path.is_file():
        raise ConfigError(f"--report_only needs {study.json_path}: run the comparison first.")
    if not study.histories_path.is_file():
        raise ConfigError(f"--report_only needs the per-step histories {study.histories_path}; it is missing.")
    study.data = json.loads(study.json_path.read_text())
    study.histories = json.loads(gzip.decompress(study.histories_path.read_bytes()))
    missing = [f"{r['arm']}-seed{r['seed']}" for r in study.data["runs"]
               if f"{r['arm']}-seed{r['seed']}" not in study.histories]  # fmt: skip
    if missing:
        raise ConfigError(f"--report_only: {study.histories_path} lacks the histories of {', '.join(missing)}.")
    study.report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the comparison YAML")
    parser.add_argument("--data_source", help="the folder the YAML's data.splits files are read from")
    parser.add_argument("--pool", type=int, help="runs at a time (default: the YAML's pool, else one per CPU/GPU)")
    parser.add_argument("--report_only", action="store_true", help="rebuild the report and figure; run nothing")
    parser.add_argument("--arms", nargs="+", help="only these arms (a recorded cell is re-run and checked)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (a recorded cell is re-run, checked)")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run's record as it finishes")
    args = parser.parse_args(argv)
    try:
        config = load_config(Path(args.config), args.data_source)
        config.update(only_arms=args.arms, only_seeds=args.seeds, commit=args.commit)
        for arm in args.arms or []:
            if arm not in config["arms"]:
                arms = ", ".join(config["arms"])
                raise ConfigError(f"--arms: {arm!r} is not an arm of {args.config}; its arms: {arms}.")
        for seed in args.seeds or []:
            if seed not in config["seeds"]:
                raise ConfigError(f"--seeds: {seed} is not a seed of {args.config}; its seeds: {config['seeds']}.")
        if args.report_only:
            report_only(config)
            print(f"wrote {config['docs_dir']}/{config['name']}.md and .png")
            return 0
        failures = run_study(config, args.pool)
        docs = Path(config["docs_dir"]) / config["name"]
        say(f"report: {docs}.md, figure: {docs}.png, records: {docs}.json")
        data = json.loads((REPO / f"{docs}.json").read_text())
        for note in compare_report.few_seeds(config, data["runs"]):
            say(f"warning: {note}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for failure in failures:
        print(f"not done: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
