"""Measure what a GR step costs: time against a plain Trainer step and a peer SAM, and the memory GR holds.

Used by `benchmark.py` beside it (see its docstring for the command line). Every configuration is a runner that
takes full optimizer steps on a fixed batch the way `Trainer`'s loop does: `on_step_begin` (through the callback
handler, so `GRMixin` plans the step), each micro-batch's `training_step` with the sync flag set, clipping,
`optimizer.step()`, the scheduler, `zero_grad`, `global_step += 1`, `on_step_end`.

Nothing is patched: the benchmark's own trainers report what they do to a `Recorder` they are given.
`TimedTrainer` times its `training_step` (one forward and backward: a pass) and marks each pass's start;
`TimedGRTrainer = GRMixin + TimedTrainer`, so the two parent steps `GRMixin` runs on a GR step are the timed
passes. The runner times the outer `training_step` call; GR's bookkeeping is that minus the passes.

- `time_configs` interleaves the configurations in one process: per round one cycle of several consecutive
  optimizer steps of each (the order rotating every round, so a cycle of `gr_probability=0.5` or `gr_interval=4`
  holds the mix of GR and plain steps), warm-up rounds discarded.
- `measure_memory` runs one configuration with a `MemoryProbe` in its recorder: the live tensor bytes at each
  pass's start (what is held while the activations build up) and after each micro-batch, and the peak RSS.
- `summarize` turns both into flat keys (medians, min–max, ratios, GR fractions, memory over parameter bytes).
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import pstats
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification, get_scheduler

from hf_gr import GRMixin, GRTrainingArguments
from hf_gr._internal import schedule

from paper_vit import paper_vit, paper_vit_config

GR_R = 0.1  # the paper's CIFAR radius; α = λ / r
CYCLE_STEPS = 8  # optimizer steps per measured sample: two whole cycles of gr_interval=4


@dataclass(frozen=True)
class ModelSpec:
    """A paper ViT for 32×32 CIFAR inputs (`paper_vit.PAPER_VIT_CONFIGS`), optionally resized, and its micro-batch.

    Args:
        name (`str`): the label printed with the results.
        batch_size (`int`): the micro-batch the steps are timed at.
        base (`str`): a key of `PAPER_VIT_CONFIGS`.
        overrides (`str`): "key=value,..." applied to the paper's config (as train.py's `--config_overrides`).
    """

    name: str
    batch_size: int
    base: str = "vit-ti"
    overrides: str = ""

    def vit_config(self) -> ViTConfig:
        return paper_vit_config(self.base, {i: f"class_{i}" for i in range(10)}, self.overrides or None)


VIT_TI = ModelSpec("vit-ti", batch_size=24)  # the paper's ViT-Ti CIFAR config; ~0.9 s a plain step on one thread
VIT_QUICK = ModelSpec(
    "vit-quick", 32, overrides="hidden_size=96,num_hidden_layers=4,num_attention_heads=3,intermediate_size=384"
)
VIT_TINY = ModelSpec(  # for the smoke test
    "vit-tiny", 4, overrides="hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"
)


@dataclass(frozen=True)
class Config:
    """One configuration to time: `kind` is "plain" (Trainer), "gr" (GRTrainer) or "peer_sam"."""

    kind: str
    gr_lambda: float = 0.0
    warmup: str = "none"
    method: str = "finite_difference"
    accumulation: int = 1
    interval: int = 1
    probability: float = 1.0
    reuse: bool = False
    ascent_fraction: float = 1.0
    direction: str = "batch"

    @property
    def baseline(self) -> str:
        """The plain configuration it is compared with (the same accumulation)."""
        return "plain_ga2" if self.accumulation == 2 else "plain"


CONFIGS: Mapping[str, Config] = MappingProxyType(
    {
        "plain": Config("plain"),
        "gr_a0.5": Config("gr", gr_lambda=0.5 * GR_R),
        "gr_a1": Config("gr", gr_lambda=GR_R),
        "zero": Config("gr", gr_lambda=GR_R, warmup="zero"),  # inside the zero-warmup phase: λ_t = 0
        "exact": Config("gr", gr_lambda=GR_R, method="exact"),
        "peer_sam": Config("peer_sam"),  # pytorch_optimizer.SAM around AdamW, rho = r (α = 1)
        "plain_ga2": Config("plain", accumulation=2),
        "gr_ga2": Config("gr", gr_lambda=0.5 * GR_R, accumulation=2),
        # the cheaper modes, at α = 1 (SAM, the CIFAR recipe), against the peer SAM
        "gr_p05": Config("gr", gr_lambda=GR_R, probability=0.5),  # the official code's hybrid mode
        "gr_interval4": Config("gr", gr_lambda=GR_R, interval=4),  # composer's SAM interval
        "gr_reuse4": Config("gr", gr_lambda=GR_R, interval=4, reuse=True),  # LookSAM
        # sub-batch ascent (m-sharpness): pass 1 on a quarter of the batch, alone and with p = 0.5
        "gr_ascent25": Config("gr", gr_lambda=GR_R, ascent_fraction=0.25),
        "gr_ascent25_p05": Config("gr", gr_lambda=GR_R, ascent_fraction=0.25, probability=0.5),
        # one-pass SAM: the direction from the previous step's applied gradient (after the first step, one pass)
        "gr_previous": Config("gr", gr_lambda=GR_R, direction="previous_step"),
    }
)


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
    """The paper's ViT (zero-initialized head), identically initialized for every configuration."""
    torch.manual_seed(seed)
    return paper_vit(spec.vit_config())


def param_bytes(model: torch.nn.Module) -> int:
    """The bytes of the trainable parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ---- what the runners report ----


class Recorder:
    """One runner's report: the seconds of each pass, and a probe called at the points the runner marks.

    Args:
        probe (`Callable[[str], None]`, *optional*): called with "pass_start" before each pass and with
            "micro_batch_end" after each micro-batch (a `MemoryProbe` in `measure_memory`).
    """

    def __init__(self, probe: Callable[[str], None] | None = None) -> None:
        self.pass_seconds: list[float] = []
        self.probe = probe

    def point(self, where: str) -> None:
        if self.probe is not None:
            self.probe(where)

    @contextlib.contextmanager
    def timed_pass(self) -> Iterator[None]:
        self.point("pass_start")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.pass_seconds.append(time.perf_counter() - start)


class TimedTrainer(Trainer):
    """A `Trainer` whose every `training_step` call (one forward and backward) is timed into `recorder`."""

    def __init__(self, *args: Any, recorder: Recorder, **kwargs: Any) -> None:
        self.recorder = recorder
        super().__init__(*args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        with self.recorder.timed_pass():
            return super().training_step(model, inputs, num_items_in_batch)


class TimedGRTrainer(GRMixin, TimedTrainer):
    """`GRTrainer` with timed passes: `GRMixin.training_step` runs `TimedTrainer.training_step` once per pass."""


class MemoryProbe:
    """The peak live tensor bytes (`.grad`s included) at the points a runner marks, once `enabled`.

    Args:
        model (`torch.nn.Module`): whose parameters' `.grad`s are counted explicitly (they can live in C++ only).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.enabled = False
        self.at_pass_start = 0  # the most held when a pass starts: what the activations build on
        self.at_any_point = 0  # pass starts and micro-batch ends (where a plain step holds its `.grad`)

    def __call__(self, where: str) -> None:
        if not self.enabled:
            return
        live = live_tensor_bytes(p.grad for p in self.model.parameters() if p.grad is not None)
        self.at_any_point = max(self.at_any_point, live)
        if where == "pass_start":
            self.at_pass_start = max(self.at_pass_start, live)


def live_tensor_bytes(extra: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of all live CPU tensors reachable from Python (plus `extra`), each storage counted once."""
    extra = list(extra)
    gc.collect()
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


# ---- the runners ----


@dataclass(frozen=True)
class Sample:
    """One measured cycle of consecutive optimizer steps of one configuration."""

    seconds: float  # the whole cycle
    steps: int
    gr_steps: int  # steps planned as GR steps (two passes; one for `gr_method="exact"`)
    passes: int
    pass_seconds: float  # inside the passes
    step_call_seconds: float  # inside the outer `training_step` calls: the passes plus GR's bookkeeping


class StepRunner:
    """One configuration's model, optimizer, batches and `Recorder`; `step()` takes one full optimizer step."""

    name: str
    model: torch.nn.Module
    recorder: Recorder

    def step(self) -> tuple[bool, float]:
        """One optimizer step: (whether it was a GR step, seconds inside the outer `training_step` calls)."""
        raise NotImplementedError

    def cycle(self, steps: int) -> Sample:
        """`steps` consecutive optimizer steps, timed as a whole."""
        self.recorder.pass_seconds.clear()
        gr_steps, step_calls = 0, 0.0
        start = time.perf_counter()
        for _ in range(steps):
            gr, seconds = self.step()
            gr_steps += gr
            step_calls += seconds
        elapsed = time.perf_counter() - start
        passes = self.recorder.pass_seconds
        return Sample(elapsed, steps, gr_steps, len(passes), sum(passes), step_calls)


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
        gr_interval=config.interval,
        gr_probability=config.probability,
        gr_reuse=config.reuse,
        gr_ascent_fraction=config.ascent_fraction,
        gr_ascent_direction=config.direction,
    )


class TrainerStepRunner(StepRunner):
    """A `TimedTrainer` or `TimedGRTrainer` driven one optimizer step at a time, as its training loop does."""

    def __init__(self, name: str, config: Config, spec: ModelSpec, seed: int = 0) -> None:
        self.name = name
        self.recorder = Recorder()
        self._output_dir = tempfile.TemporaryDirectory(prefix="hf_gr_bench_")
        args = _training_arguments(config, spec, self._output_dir.name)
        trainer_class = TimedTrainer if config.kind == "plain" else TimedGRTrainer
        self.trainer = trainer = trainer_class(model=make_model(spec, seed), args=args, recorder=self.recorder)
        trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
        self.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.model_wrapped = self.model
        trainer.state.max_steps = args.max_steps
        if isinstance(trainer, GRMixin):  # what `train()` does first: GR binds to the optimizer (one-pass SAM's D)
            trainer.control = trainer.callback_handler.on_train_begin(args, trainer.state, trainer.control)
        batches = make_batches(spec, config.accumulation, seed)
        self.batches, self.num_items_in_batch = trainer.get_batch_samples(iter(batches), len(batches), args.device)

    def step(self) -> tuple[bool, float]:
        trainer, model, args = self.trainer, self.model, self.trainer.args
        handler = trainer.callback_handler
        trainer.current_gradient_accumulation_steps = len(self.batches)
        trainer.control = handler.on_step_begin(args, trainer.state, trainer.control)
        gr = isinstance(trainer, GRMixin) and trainer._gr_step_plan().kind == schedule.GR  # the plan it will run
        step_calls = 0.0
        for i, inputs in enumerate(self.batches):
            last = i == len(self.batches) - 1
            trainer.accelerator.gradient_state._set_sync_gradients(last)
            with contextlib.nullcontext() if last else trainer.accelerator.no_sync(model):
                start = time.perf_counter()
                trainer.training_step(model, inputs, self.num_items_in_batch)
                step_calls += time.perf_counter() - start
            self.recorder.point("micro_batch_end")
        if args.max_grad_norm > 0:
            trainer._clip_grad_norm(model)
        trainer.control = handler.on_pre_optimizer_step(args, trainer.state, trainer.control)
        trainer.optimizer.step()
        trainer.control = handler.on_optimizer_step(args, trainer.state, trainer.control)
        trainer.lr_scheduler.step()
        model.zero_grad()
        trainer.state.global_step += 1
        trainer.control = handler.on_step_end(args, trainer.state, trainer.control)
        return gr, step_calls


class PeerSAMRunner(StepRunner):
    """The peer: `pytorch_optimizer.SAM` around `torch.optim.AdamW`, in its documented two-step usage.

    Same model, data, AdamW settings and parameter groups (no decay on biases and norms) as the Trainer, the
    same linear scheduler and clipping (of g2, before the base optimizer step), rho = r, its defaults otherwise
    (adaptive=False; foreach=None, i.e. per-tensor loops on CPU). Its `first_step` counts as bookkeeping.
    """

    def __init__(self, name: str, spec: ModelSpec, seed: int = 0) -> None:
        from pytorch_optimizer import SAM

        self.name = name
        self.recorder = Recorder()
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
        self.batch = make_batches(spec, 1, seed)[0]

    def _pass(self) -> None:
        with self.recorder.timed_pass():
            self.model(**self.batch).loss.backward()

    def step(self) -> tuple[bool, float]:
        start = time.perf_counter()
        self._pass()
        self.optimizer.first_step(zero_grad=True)
        self._pass()
        step_calls = time.perf_counter() - start
        self.recorder.point("micro_batch_end")
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.second_step(zero_grad=True)
        self.scheduler.step()
        return True, step_calls


def build_runner(name: str, spec: ModelSpec, seed: int = 0) -> StepRunner:
    """The runner of configuration `name` (a key of `CONFIGS`)."""
    config = CONFIGS[name]
    if config.kind == "peer_sam":
        return PeerSAMRunner(name, spec, seed)
    return TrainerStepRunner(name, config, spec, seed)


# ---- timing ----


@dataclass
class Timings:
    """The measured cycles of every configuration, one per round, in round order."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)


def time_configs(
    names: list[str],
    spec: ModelSpec,
    rounds: int,
    warmup: int,
    cycle_steps: int = CYCLE_STEPS,
    log: Callable[[str], None] | None = None,
) -> Timings:
    """Time `rounds` cycles of `cycle_steps` optimizer steps per configuration, interleaved, after `warmup` rounds.

    Each round runs one cycle of every configuration, the order rotating by one every round. Between cycles (not
    inside them) a garbage collection runs; `gc.freeze` keeps the collections inside a cycle short.
    """
    runners = [build_runner(name, spec) for name in names]
    timings = Timings({name: [] for name in names})
    gc.collect()
    gc.freeze()
    try:
        for round_index in range(warmup + rounds):
            shift = round_index % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                gc.collect()
                sample = runner.cycle(cycle_steps)
                if round_index >= warmup:
                    timings.samples[runner.name].append(sample)
            if log is not None:
                kind = "warm-up" if round_index < warmup else "measured"
                log(f"round {round_index + 1}/{warmup + rounds} ({kind}) done")
    finally:
        gc.unfreeze()
    return timings


def profile_cycle(name: str, spec: ModelSpec, steps: int = CYCLE_STEPS, top: int = 30) -> str:
    """cProfile of one cycle of configuration `name` after a warm-up cycle: the `top` functions by own time."""
    runner = build_runner(name, spec)
    runner.cycle(steps)
    profiler = cProfile.Profile()
    profiler.enable()
    sample = runner.cycle(steps)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return f"{name}: {steps} steps, {sample.gr_steps} GR steps, {sample.seconds:.3f} s (profiled)\n{text.getvalue()}"


# ---- memory ----


def measure_memory(name: str, spec: ModelSpec, steps: int | None = None, warmup: int = 1) -> dict[str, float]:
    """Run configuration `name` alone: its peak live tensor bytes at pass starts and at every point, peak RSS.

    Objects that exist before the call are frozen (`gc.freeze`) and not counted: they are the same for every
    configuration, and the counts get fast. Warm-up steps create the optimizer state first, so configurations
    compare at the same state. The measured steps follow (default: one cycle for the cheaper modes, so that they
    hold a GR step, else 2). Peak RSS is the process's high-water mark: meaningful only when the process ran
    nothing else (`scripts/benchmarks/benchmark.py` runs each configuration in a subprocess).
    """
    config = CONFIGS[name]
    if steps is None:
        steps = CYCLE_STEPS if config.interval > 1 or config.probability < 1 else 2
    gc.collect()
    gc.freeze()  # what exists now is left out of the counts (and of the collections that precede each count)
    try:
        runner = build_runner(name, spec)
        probe = MemoryProbe(runner.model)
        runner.recorder.probe = probe
        runner.cycle(warmup)
        probe.enabled = True
        sample = runner.cycle(steps)
    finally:
        gc.unfreeze()
    return {
        "live_at_pass_start_bytes": float(probe.at_pass_start),
        "live_peak_bytes": float(probe.at_any_point),
        "param_bytes": float(param_bytes(runner.model)),
        "peak_rss_bytes": float(peak_rss_bytes()),
        "memory_gr_steps": float(sample.gr_steps),
    }


# ---- summary ----

RATIOS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "gr_a0.5_over_plain": ("gr_a0.5", "plain"),
        "gr_a1_over_plain": ("gr_a1", "plain"),
        "zero_over_plain": ("zero", "plain"),
        "exact_over_plain": ("exact", "plain"),
        "gr_over_peer_sam": ("gr_a1", "peer_sam"),
        "gr_ga2_over_plain_ga2": ("gr_ga2", "plain_ga2"),
        "peer_sam_over_plain": ("peer_sam", "plain"),
        "gr_p05_over_plain": ("gr_p05", "plain"),
        "gr_interval4_over_plain": ("gr_interval4", "plain"),
        "gr_reuse4_over_plain": ("gr_reuse4", "plain"),
        "gr_p05_over_peer_sam": ("gr_p05", "peer_sam"),
        "gr_reuse4_over_gr_interval4": ("gr_reuse4", "gr_interval4"),  # what the reuse correction costs
        "gr_ascent25_over_plain": ("gr_ascent25", "plain"),
        "gr_ascent25_over_peer_sam": ("gr_ascent25", "peer_sam"),
        "gr_ascent25_over_gr_a1": ("gr_ascent25", "gr_a1"),  # what the sub-batch saves on a GR step
        "gr_ascent25_p05_over_plain": ("gr_ascent25_p05", "plain"),
        "gr_previous_over_plain": ("gr_previous", "plain"),
        "gr_previous_over_peer_sam": ("gr_previous", "peer_sam"),
    }
)
# the headline memory keys: extra_bytes_over_param_bytes{suffix} is the configuration's, against its baseline
MEMORY_KEYS: Mapping[str, str] = MappingProxyType(
    {"": "gr_a1", "_a05": "gr_a0.5", "_ga": "gr_ga2", "_reuse": "gr_reuse4", "_previous": "gr_previous"}
)
# measurement suffix: pass starts (the headline: what the activations build on), every probe point, peak RSS
MEMORY_MEASURES: Mapping[str, str] = MappingProxyType(
    {"": "live_at_pass_start_bytes", "_points": "live_peak_bytes", "_rss": "peak_rss_bytes"}
)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _at_probability(samples: Mapping[str, list[Sample]], name: str, against: str) -> float | None:
    """`name` over `against` with each round's GR fraction rescaled to exactly p (median over the rounds).

    A round's cycle of `name` takes plain + f·(GR − plain) per step at realized fraction f; with the same round's
    plain cycle this gives plain + p·(GR − plain), free of the luck of the draws.
    """
    if any(n not in samples for n in (name, against, "plain")):
        return None
    p = CONFIGS[name].probability
    ratios = [
        (plain.seconds + (x.seconds - plain.seconds) * p * x.steps / x.gr_steps) / y.seconds
        for x, y, plain in zip(samples[name], samples[against], samples["plain"])
        if x.gr_steps > 0
    ]
    return _median(ratios) if ratios else None


def summarize(timings: Timings, memory: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flat keys: per configuration seconds per step and its split, the ratios, GR fractions, memory ratios."""
    out: dict[str, float] = {}
    samples = {name: values for name, values in timings.samples.items() if values}
    for name, values in samples.items():
        per_step = [s.seconds / s.steps for s in values]
        steps = sum(s.steps for s in values)
        out[f"{name}_median_s"] = _median(per_step)
        out[f"{name}_min_s"] = min(per_step)
        out[f"{name}_max_s"] = max(per_step)
        out[f"{name}_rounds"] = float(len(values))
        out[f"{name}_steps"] = float(steps)
        out[f"{name}_gr_fraction"] = sum(s.gr_steps for s in values) / steps  # realized, over the measured steps
        out[f"{name}_passes_per_step"] = sum(s.passes for s in values) / steps
        out[f"{name}_pass_median_s"] = _median([s.pass_seconds / s.steps for s in values])
        out[f"{name}_bookkeeping_median_s"] = _median(
            [(s.step_call_seconds - s.pass_seconds) / s.steps for s in values]
        )
        out[f"{name}_optimizer_and_rest_median_s"] = _median(
            [(s.seconds - s.step_call_seconds) / s.steps for s in values]
        )
        out[f"{name}_overhead_fraction"] = out[f"{name}_bookkeeping_median_s"] / out[f"{name}_median_s"]

    for key, (a, b) in RATIOS.items():
        if a in samples and b in samples:  # headline: the median of per-round ratios (robust to drift)
            out[key] = _median([x.seconds / y.seconds for x, y in zip(samples[a], samples[b])])
            out[f"{key}_of_medians"] = out[f"{a}_median_s"] / out[f"{b}_median_s"]
    gr_ratios = [out[k] for k in ("gr_a0.5_over_plain", "gr_a1_over_plain") if k in out]
    if gr_ratios:
        out["gr_over_plain"] = max(gr_ratios)  # the worse of α = 0.5 and α = 1
    fractions = [out[f"{n}_overhead_fraction"] for n in ("gr_a0.5", "gr_a1") if n in samples]
    if fractions:
        out["overhead_fraction"] = max(fractions)
    for name, against in (("gr_p05", "plain"), ("gr_p05", "peer_sam"), ("gr_ascent25_p05", "plain")):
        value = _at_probability(samples, name, against)
        if value is not None:
            out[f"{name}_over_{against}_at_p"] = value

    for name, values in memory.items():
        for key, value in values.items():
            out[f"{name}_{key}"] = value
    for name, values in memory.items():
        baseline = memory.get(CONFIGS[name].baseline)
        if baseline is None or name == CONFIGS[name].baseline:
            continue
        for suffix, measure in MEMORY_MEASURES.items():
            extra = (values[measure] - baseline[measure]) / baseline["param_bytes"]
            out[f"{name}_extra_bytes_over_param_bytes{suffix}"] = extra
    for key_suffix, name in MEMORY_KEYS.items():
        for suffix in MEMORY_MEASURES:
            value = out.get(f"{name}_extra_bytes_over_param_bytes{suffix}")
            if value is not None:
                out[f"extra_bytes_over_param_bytes{key_suffix}{suffix}"] = value
    return out
