"""Measure what a GR step costs: time against a plain Trainer step and a peer SAM, and the memory GR holds.

Used by `scripts/benchmark.py` (see its docstring for the command line). Every configuration is a `StepRunner`
that takes one full optimizer step on a fixed batch, the way `Trainer`'s loop does it: `on_step_begin`, each
micro-batch's `training_step`, clipping, `optimizer.step()`, the scheduler, `model.zero_grad()`.

- `time_configs` interleaves the configurations in one process (one step each per round, the order rotating
  every round), discards warm-up rounds, and splits each GR step into the passes and GR's bookkeeping by timing
  `Trainer.training_step` and the `hf_gr.gradient` functions (the outer `GRTrainer.training_step` minus the
  passes is the bookkeeping).
- `measure_memory` runs one configuration and records the bytes of all live tensors (storages counted once)
  where GR holds its buffers: when `perturb_` returns (θ's copy, g1 and, under accumulation, the put-aside
  gradients all alive), after every micro-batch, and after each of the peer's passes. GR's extra bytes are
  its maximum minus the plain configuration's maximum.
- `summarize` turns both into flat keys (medians, min–max, ratios, memory over parameter bytes).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import resource
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification, get_scheduler

from hf_gr import GRTrainer, GRTrainingArguments, gradient

GR_R = 0.1  # the paper's CIFAR radius; α = λ / r
BOOKKEEPING_FUNCTIONS = (
    "take_grads",
    "params_with_grads",
    "global_grad_norm",
    "snapshot",
    "perturb_",
    "prepare_second_pass_",
    "finish_second_pass_",
    "restore_",
)


@dataclass(frozen=True)
class ModelSpec:
    """A ViT for 32×32 inputs (patch 4) and the micro-batch it is timed at."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    batch_size: int

    def vit_config(self) -> ViTConfig:
        return ViTConfig(
            image_size=32,
            patch_size=4,
            num_channels=3,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            num_labels=10,
        )


VIT_TI = ModelSpec("vit-ti", 192, 12, 3, 768, batch_size=24)  # the paper's ViT-Ti CIFAR config; ~0.8 s a step
VIT_QUICK = ModelSpec("vit-quick", 96, 4, 3, 384, batch_size=32)
VIT_TINY = ModelSpec("vit-tiny", 32, 1, 2, 64, batch_size=4)  # for the smoke test


@dataclass(frozen=True)
class Config:
    """One configuration to time: `kind` is "plain" (Trainer), "gr" (GRTrainer) or "peer_sam"."""

    kind: str
    gr_lambda: float = 0.0
    warmup: str = "none"
    method: str = "finite_difference"
    accumulation: int = 1


CONFIGS: dict[str, Config] = {
    "plain": Config("plain"),
    "gr_a0.5": Config("gr", gr_lambda=0.5 * GR_R),
    "gr_a1": Config("gr", gr_lambda=GR_R),
    "zero": Config("gr", gr_lambda=GR_R, warmup="zero"),  # inside the zero-warmup phase: λ_t = 0
    "exact": Config("gr", gr_lambda=GR_R, method="exact"),
    "peer_sam": Config("peer_sam"),  # pytorch_optimizer.SAM around AdamW, rho = r (α = 1)
    "plain_ga2": Config("plain", accumulation=2),
    "gr_ga2": Config("gr", gr_lambda=0.5 * GR_R, accumulation=2),
}


def make_batches(spec: ModelSpec, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` random CIFAR-shaped micro-batches (3×32×32 images, 10 classes), the same for every configuration."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(spec.batch_size, 3, 32, 32, generator=generator),
            "labels": torch.randint(0, 10, (spec.batch_size,), generator=generator),
        }
        for _ in range(count)
    ]


def make_model(spec: ModelSpec, seed: int = 0) -> ViTForImageClassification:
    """The ViT, identically initialized for every configuration."""
    torch.manual_seed(seed)
    return ViTForImageClassification(spec.vit_config())


def _training_arguments(config: Config, spec: ModelSpec, output_dir: str) -> TrainingArguments:
    common: dict[str, Any] = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        max_steps=1_000_000,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=config.accumulation,
        learning_rate=1e-3,
        weight_decay=0.3,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    if config.kind == "plain":
        return TrainingArguments(**common)
    return GRTrainingArguments(
        **common,
        gr_lambda=config.gr_lambda,
        gr_r=GR_R,
        gr_warmup_strategy=config.warmup,
        gr_warmup_steps=1_000_000_000 if config.warmup == "zero" else None,
        gr_method=config.method,
    )


class StepRunner:
    """One configuration's model, optimizer and batches; `step()` takes one full optimizer step."""

    name: str
    model: torch.nn.Module
    microbatch_times: list[float]  # the outer `training_step` call of each micro-batch of the last step

    def step(self) -> None:
        raise NotImplementedError


class TrainerStepRunner(StepRunner):
    """A `Trainer` or `GRTrainer` driven one optimizer step at a time, as its training loop does."""

    def __init__(self, name: str, config: Config, spec: ModelSpec, seed: int = 0) -> None:
        self.name = name
        self._output_dir = tempfile.TemporaryDirectory(prefix="hf_gr_bench_")
        args = _training_arguments(config, spec, self._output_dir.name)
        trainer_class = Trainer if config.kind == "plain" else GRTrainer
        self.trainer = trainer_class(model=make_model(spec, seed), args=args)
        trainer = self.trainer
        trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
        self.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.model_wrapped = self.model
        batches = make_batches(spec, config.accumulation, seed)
        self.batches, self.num_items_in_batch = trainer.get_batch_samples(iter(batches), len(batches), args.device)
        self.microbatch_times = []

    def step(self) -> None:
        trainer, model = self.trainer, self.model
        trainer.current_gradient_accumulation_steps = len(self.batches)
        trainer.control = trainer.callback_handler.on_step_begin(trainer.args, trainer.state, trainer.control)
        self.microbatch_times = []
        for i, inputs in enumerate(self.batches):
            last = i == len(self.batches) - 1
            trainer.accelerator.gradient_state._set_sync_gradients(last)
            sync_context = contextlib.nullcontext() if last else trainer.accelerator.no_sync(model)
            with sync_context:
                start = time.perf_counter()
                trainer.training_step(model, inputs, self.num_items_in_batch)
                self.microbatch_times.append(time.perf_counter() - start)
            _record_memory_point()
        if trainer.args.max_grad_norm > 0:
            trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        trainer.state.global_step += 1


class PeerSAMRunner(StepRunner):
    """The peer: `pytorch_optimizer.SAM` around `torch.optim.AdamW`, in its documented two-step usage.

    Same model, data, AdamW settings and parameter groups (no decay on biases and norms) as the Trainer, the
    same linear scheduler and clipping (of g2, before the base optimizer step), rho = r, its defaults otherwise
    (adaptive=False; foreach=None, i.e. per-tensor loops on CPU).
    """

    def __init__(self, name: str, spec: ModelSpec, seed: int = 0) -> None:
        from pytorch_optimizer import SAM

        self.name = name
        self.model = make_model(spec, seed)
        self.model.train()
        decay = set(Trainer.get_decay_parameter_names(None, self.model))  # the Trainer's grouping (uses no self)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.3},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        self.optimizer = SAM(groups, torch.optim.AdamW, rho=GR_R, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = get_scheduler("linear", self.optimizer.base_optimizer, 0, 1_000_000)
        self.batches = make_batches(spec, 1, seed)
        self.microbatch_times = []

    def _loss(self) -> torch.Tensor:
        if _memory_probe is not None:
            _memory_probe("pass_start")
        return self.model(**self.batches[0]).loss

    def step(self) -> None:
        start = time.perf_counter()
        self._loss().backward()
        self.optimizer.first_step(zero_grad=True)
        _record_memory_point()
        self._loss().backward()
        _record_memory_point()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.second_step(zero_grad=True)
        self.scheduler.step()
        self.microbatch_times = [time.perf_counter() - start]


def build_runner(name: str, spec: ModelSpec, seed: int = 0) -> StepRunner:
    """The runner of configuration `name` (a key of `CONFIGS`)."""
    config = CONFIGS[name]
    if config.kind == "peer_sam":
        return PeerSAMRunner(name, spec, seed)
    return TrainerStepRunner(name, config, spec, seed)


def param_bytes(model: torch.nn.Module) -> int:
    """The bytes of the trainable parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ---- instrumentation: timers around the passes and the bookkeeping, memory points ----

_timings: dict[str, float] = defaultdict(float)  # seconds per function, reset every step
_memory_probe: Callable[[str], None] | None = None  # called with "pass_start" or "bookkeeping"


def _timed(name: str, function: Callable[..., Any], probe: bool = False) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if name == "pass" and _memory_probe is not None:
            _memory_probe("pass_start")  # what is held while the pass's activations build up
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _timings[name] += time.perf_counter() - start
            if probe and _memory_probe is not None:
                _memory_probe("bookkeeping")

    return wrapper


def _record_memory_point() -> None:
    if _memory_probe is not None:
        _memory_probe("bookkeeping")


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Time `Trainer.training_step` (one pass) and the `hf_gr.gradient` bookkeeping functions while inside."""
    originals = {name: getattr(gradient, name) for name in BOOKKEEPING_FUNCTIONS}
    original_step = Trainer.training_step
    try:
        for name, function in originals.items():
            # `perturb_` returns with θ's copy, g1 and (under accumulation) the put-aside gradients all alive;
            # after `prepare_second_pass_`, what stays alive is what GR holds through pass 2.
            setattr(gradient, name, _timed(name, function, probe=name in ("perturb_", "prepare_second_pass_")))
        Trainer.training_step = _timed("pass", original_step)
        yield
    finally:
        for name, function in originals.items():
            setattr(gradient, name, function)
        Trainer.training_step = original_step


# ---- timing ----


@dataclass
class Timings:
    """Per-configuration step times and, for every step, the seconds spent in passes and in bookkeeping."""

    steps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    split: dict[str, list[dict[str, float]]] = field(default_factory=lambda: defaultdict(list))


def time_configs(
    names: list[str], spec: ModelSpec, steps: int, warmup: int, log: Callable[[str], None] | None = None
) -> Timings:
    """Time `steps` optimizer steps of every configuration, interleaved (order rotating per round), after `warmup`."""
    runners = [build_runner(name, spec) for name in names]
    timings = Timings()
    gc.collect()
    gc.freeze()  # keep the per-step collections (outside the timed region) short
    with instrumented(), contextlib.ExitStack() as stack:
        stack.callback(gc.unfreeze)
        for round_index in range(warmup + steps):
            shift = round_index % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                _timings.clear()
                gc.collect()
                start = time.perf_counter()
                runner.step()
                elapsed = time.perf_counter() - start
                if round_index < warmup:
                    continue
                timings.steps[runner.name].append(elapsed)
                split = dict(_timings)
                outer = sum(runner.microbatch_times)
                split["bookkeeping"] = max(outer - split.get("pass", 0.0), 0.0) if "pass" in split else 0.0
                split["optimizer_and_rest"] = elapsed - outer
                timings.split[runner.name].append(split)
            if log is not None:
                kind = "warm-up" if round_index < warmup else "measured"
                log(f"round {round_index + 1}/{warmup + steps} ({kind}) done")
    return timings


# ---- memory ----


def live_tensor_bytes(extra: list[torch.Tensor]) -> int:
    """Bytes of all live CPU tensors reachable from Python (plus `extra`), each storage counted once."""
    seen: dict[int, int] = {}
    objects = gc.get_objects()  # holds this frame too: cleared below, or the cycle keeps every tensor alive
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on some deprecated module attributes warns
            tensors = [obj for obj in objects if isinstance(obj, torch.Tensor)]
        for tensor in [*tensors, *extra]:
            if tensor.device.type != "cpu":
                continue
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if storage.data_ptr() != 0:
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    finally:
        objects.clear()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM (its own, unlike `ru_maxrss`, which survives fork + exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(name: str, spec: ModelSpec, steps: int = 2, warmup: int = 1) -> dict[str, float]:
    """Run configuration `name` alone; the peak of live tensor bytes at GR's bookkeeping points, and peak RSS.

    Parameter `.grad`s are counted explicitly (they can live in C++ only). Warm-up steps create the optimizer
    state first, so configurations compare at the same state. Peak RSS is the process's high-water mark: meaningful
    only when the process ran nothing else (`scripts/benchmark.py` runs each configuration in a subprocess).
    """
    global _memory_probe
    gc.collect()
    runner = build_runner(name, spec)
    peaks = {"bookkeeping": 0, "pass_start": 0}

    def probe(point: str) -> None:
        grads = [p.grad for p in runner.model.parameters() if p.grad is not None]
        live = live_tensor_bytes(grads)
        peaks["bookkeeping"] = max(peaks["bookkeeping"], live)
        if point == "pass_start":
            peaks["pass_start"] = max(peaks["pass_start"], live)

    with instrumented():
        for _ in range(warmup):
            runner.step()
        _memory_probe = probe
        try:
            for _ in range(steps):
                runner.step()
        finally:
            _memory_probe = None
    return {
        "live_peak_bytes": float(peaks["bookkeeping"]),
        "live_at_pass_start_bytes": float(peaks["pass_start"]),
        "param_bytes": float(param_bytes(runner.model)),
        "peak_rss_bytes": float(peak_rss_bytes()),
    }


# ---- summary ----


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(timings: Timings, memory: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat keys: per configuration median/min/max seconds, the ratios, the overhead split, memory ratios."""
    out: dict[str, float] = {}
    for name, values in timings.steps.items():
        out[f"{name}_median_s"] = _median(values)
        out[f"{name}_min_s"] = min(values)
        out[f"{name}_max_s"] = max(values)
        out[f"{name}_steps"] = float(len(values))

    def ratio(a: str, b: str) -> float | None:
        if a in timings.steps and b in timings.steps:
            return out[f"{a}_median_s"] / out[f"{b}_median_s"]
        return None

    def paired(a: str, b: str) -> float | None:
        if a in timings.steps and b in timings.steps:
            return _median([x / y for x, y in zip(timings.steps[a], timings.steps[b])])
        return None

    pairs = {
        "gr_a0.5_over_plain": ("gr_a0.5", "plain"),
        "gr_a1_over_plain": ("gr_a1", "plain"),
        "zero_over_plain": ("zero", "plain"),
        "exact_over_plain": ("exact", "plain"),
        "gr_over_peer_sam": ("gr_a1", "peer_sam"),
        "gr_ga2_over_plain_ga2": ("gr_ga2", "plain_ga2"),
        "peer_sam_over_plain": ("peer_sam", "plain"),
    }
    for key, (a, b) in pairs.items():
        value, value_paired = ratio(a, b), paired(a, b)
        if value is not None:  # headline: the median of per-round ratios (robust to drift on a shared CPU)
            out[key] = value_paired
            out[f"{key}_of_medians"] = value
    gr_ratios = [out[k] for k in ("gr_a0.5_over_plain", "gr_a1_over_plain") if k in out]
    if gr_ratios:
        out["gr_over_plain"] = max(gr_ratios)  # the worse of α = 0.5 and α = 1

    fractions = []
    for name, splits in timings.split.items():
        if CONFIGS[name].kind != "gr" or CONFIGS[name].method != "finite_difference" or name == "zero":
            continue
        step = out[f"{name}_median_s"]
        for part in (*BOOKKEEPING_FUNCTIONS, "pass", "bookkeeping", "optimizer_and_rest"):
            out[f"{name}_{part}_median_s"] = _median([s.get(part, 0.0) for s in splits])
        out[f"{name}_overhead_fraction"] = out[f"{name}_bookkeeping_median_s"] / step
        if CONFIGS[name].accumulation == 1:
            fractions.append(out[f"{name}_overhead_fraction"])
    if fractions:
        out["overhead_fraction"] = max(fractions)

    for name, values in memory.items():
        for key, value in values.items():
            out[f"{name}_{key}"] = value

    def extra(a: str, b: str, key: str) -> float | None:
        if a in memory and b in memory:
            return (memory[a][key] - memory[b][key]) / memory[b]["param_bytes"]
        return None

    for suffix, key in (
        ("", "live_peak_bytes"),
        ("_at_pass", "live_at_pass_start_bytes"),
        ("_rss", "peak_rss_bytes"),
    ):
        for name in ("gr_a0.5", "gr_a1", "zero", "exact", "peer_sam"):
            value = extra(name, "plain", key)
            if value is not None:
                out[f"{name}_extra_bytes_over_param_bytes{suffix}"] = value
        gr_values = [out.get(f"{n}_extra_bytes_over_param_bytes{suffix}") for n in ("gr_a0.5", "gr_a1")]
        gr_values = [v for v in gr_values if v is not None]
        if gr_values:
            out[f"extra_bytes_over_param_bytes{suffix}"] = max(gr_values)
        value = extra("gr_ga2", "plain_ga2", key)
        if value is not None:
            out[f"extra_bytes_over_param_bytes_ga{suffix}"] = value
    return out
