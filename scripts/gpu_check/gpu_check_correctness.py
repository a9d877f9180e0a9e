"""Section 1 of `scripts/gpu_check/gpu_check.py`: is the GR step correct on this device?

Each check returns a dict with `passed` (True, False, or None where it does not apply) and its measurements:

- `fp32`, `bf16`, `fp16`: one GR step through `GRTrainer.train()` (fp16: the Trainer's own GradScaler) against the
  float64 GR gradient written out from the definitions; mixed precision is judged against the same precision's
  plain gradient (GR may be at most 4× as far from float64 as a plain step) and must be much closer to the GR
  gradient than to the plain one (so the check can tell GR from plain);
- `dropout_replay`: both passes see the same dropout masks on this device's RNG;
- `skipped_step`: a non-finite GR step under fp16 leaves θ unchanged, backs the scale off, and does not step the
  LR scheduler;
- `host_sync`: a GR step reads nothing back to the host (Python-level reads counted; on CUDA also
  `torch.cuda.set_sync_debug_mode("error")`);
- `previous_step_host_sync`: one-pass SAM's step and the optimizer step that keeps its next direction read
  nothing back to the host either, and take one pass;
- `multi_device_norm`: `hf_gr._internal.gradient.squared_norm` over gradients on several devices against float64 on
  the CPU.

FSDP2 runs in its own process (`fsdp2_worker`, launched by `gpu_check.py` through torch.distributed.run).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from hf_gr import GRTrainer
from hf_gr._internal import gradient

from gpu_check_lib import (
    CaptureGrads,
    attach_cpu_scaler,
    count_host_syncs,
    finite_or_none,
    full_grads,
    make_vit,
    param_copies,
    random_rows,
    reference_grads,
    rel_err,
    stack_rows,
)

GR_LAMBDA, GR_R = 0.25, 0.5  # α = 0.5 exercises the mix; r large enough that GR and plain gradients differ clearly
FP32_TOLERANCE = {"cuda": 1e-4, "cpu": 1e-6}  # TF32 off
MIXED_FACTOR, MIXED_FLOOR = 4.0, 1e-4


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """float32 matmuls and convolutions in full float32 (TF32 would cost ~1e-3 relative)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def one_captured_step(ctx: Any, precision: str, gr: bool, dropout: float = 0.0, **overrides: Any):
    """One optimizer step through `GRTrainer.train()` (plain when `gr` is False: λ = 0, the stock step);
    returns (trainer, model, rows, gradients right before the optimizer step, unscaled)."""
    dims = ctx.sizes.check_dims
    rows = random_rows(dims, ctx.sizes.check_batch)
    model = make_vit(dims, dropout=dropout, zero_head=False)
    capture = CaptureGrads(0)
    args = ctx.training_args(
        max_steps=1, per_device_train_batch_size=len(rows), optim="sgd", learning_rate=0.1, max_grad_norm=1e9,
        bf16=precision == "bf16", fp16=precision == "fp16", gr_lambda=GR_LAMBDA if gr else 0.0, gr_r=GR_R,
        **overrides,
    )  # fmt: skip
    trainer = GRTrainer(model=model, args=args, train_dataset=rows, callbacks=[capture])
    if precision == "fp16" and not ctx.cuda:
        attach_cpu_scaler(trainer)
    trainer.train()
    return trainer, model, rows, capture.grads


def gr_vs_float64(ctx: Any, precision: str) -> dict[str, Any]:
    """The GR gradient of one step in `precision` against float64."""
    guard = no_tf32() if precision == "fp32" else contextlib.nullcontext()
    with guard:
        trainer, _, rows, got_gr = one_captured_step(ctx, precision, gr=True)
        _, _, _, got_plain = one_captured_step(ctx, precision, gr=False)
    initial = make_vit(ctx.sizes.check_dims, dropout=0.0, zero_head=False)  # the same seed: θ before the step
    want_gr, want_plain = reference_grads(initial, stack_rows(rows), GR_LAMBDA, GR_R, ctx.device)
    err, err_plain, distance = rel_err(got_gr, want_gr), rel_err(got_plain, want_plain), rel_err(want_plain, want_gr)
    if precision == "fp32":
        tolerance = FP32_TOLERANCE[ctx.device.type]
    else:
        tolerance = max(MIXED_FACTOR * err_plain, MIXED_FLOOR)
    scaler = getattr(trainer.accelerator, "scaler", None)
    return {
        "passed": bool(err <= tolerance and err < 0.25 * distance),
        "rel_err": finite_or_none(err),
        "tolerance": finite_or_none(tolerance),
        "plain_rel_err": finite_or_none(err_plain),
        "gr_vs_plain_distance": finite_or_none(distance),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "grad_scaler": None if scaler is None else f"{type(scaler).__name__} (scale {scaler.get_scale():g})",
        "gr_lambda": GR_LAMBDA,
        "gr_r": GR_R,
    }


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _prepared_trainer(ctx: Any, precision: str, dropout: float) -> tuple[GRTrainer, torch.nn.Module, dict]:
    """A trainer after one step (model on the device, autocast applied) and a batch on the device."""
    trainer, model, rows, _ = one_captured_step(ctx, precision, gr=True, dropout=dropout)
    batch = {k: v.to(ctx.device) for k, v in stack_rows(rows).items()}
    return trainer, trainer.model_wrapped, batch


def _grads_after(model: torch.nn.Module, step: Callable[[], Any]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    step()
    return full_grads(model)


def dropout_replay(ctx: Any) -> dict[str, Any]:
    """With θ + ε replaced by θ, a GR step's gradient is g1 + α·(g2 − g1) = g1 only if pass 2 replays pass 1's
    masks: compare it with the stock step from the same RNG state, and with the stock step from another state."""
    precision = "bf16" if ctx.cuda else "fp32"
    trainer, model, batch = _prepared_trainer(ctx, precision, dropout=0.3)
    saved_perturb = gradient.perturb_
    state = _rng_state()
    gradient.perturb_ = lambda params, grads, r, divisor: None
    try:
        trainer._gr_plan = None
        with_gr = _grads_after(model, lambda: trainer.training_step(model, dict(batch)))
    finally:
        gradient.perturb_ = saved_perturb
    _set_rng_state(state)
    same = _grads_after(model, lambda: Trainer.training_step(trainer, model, dict(batch)))
    other = _grads_after(model, lambda: Trainer.training_step(trainer, model, dict(batch)))  # RNG moved on
    err_same, err_other = rel_err(with_gr, same), rel_err(other, same)
    return {
        "passed": bool(err_other > 0 and err_same <= 0.05 * err_other),
        "rel_err_same_masks": finite_or_none(err_same),
        "rel_err_other_masks": finite_or_none(err_other),
        "precision": precision,
    }


class _InfiniteStep(TrainerCallback):
    """Makes the loss inf on optimizer step `step` and records θ, the loss scale and the scheduler around it."""

    def __init__(self, step: int) -> None:
        self.step, self.inf, self.trainer = step, False, None
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.initial: list[torch.Tensor] | None = None
        self.after_first: list[torch.Tensor] | None = None

    def _snapshot(self, model: Any) -> dict[str, Any]:
        scaler = self.trainer.accelerator.scaler
        return {"params": param_copies(model), "scale": float(scaler.get_scale()),
                "scheduler_step": int(self.trainer.lr_scheduler.last_epoch)}  # fmt: skip

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.inf = state.global_step == self.step
        if state.global_step == 0:
            self.initial = param_copies(model)
        if self.inf:
            self.before = self._snapshot(model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == 1:
            self.after_first = param_copies(model)
        if state.global_step == self.step + 1:
            self.after = self._snapshot(model)


def skipped_step(ctx: Any) -> dict[str, Any]:
    """fp16 GR training for 3 steps with an inf loss on step 1: that step must be skipped, the others taken."""
    dims = ctx.sizes.check_dims
    rows = random_rows(dims, ctx.sizes.check_batch)
    callback = _InfiniteStep(1)

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        value = F.cross_entropy(outputs["logits"].float(), labels)
        return value * float("inf") if callback.inf else value

    args = ctx.training_args(
        max_steps=3, per_device_train_batch_size=len(rows), optim="adamw_torch", learning_rate=1e-3,
        lr_scheduler_type="linear", max_grad_norm=1.0, fp16=True, gr_lambda=0.1, gr_r=0.1,
    )  # fmt: skip
    model = make_vit(dims, dropout=0.0, zero_head=False)
    trainer = GRTrainer(model=model, args=args, train_dataset=rows * 3, compute_loss_func=loss, callbacks=[callback])
    callback.trainer = trainer
    if not ctx.cuda:
        attach_cpu_scaler(trainer)
    if trainer.accelerator.scaler is None:
        return {"passed": False, "error": "no GradScaler: fp16 did not enable loss scaling"}
    trainer.train()
    b, a = callback.before, callback.after
    unchanged = all(torch.equal(x, y) for x, y in zip(b["params"], a["params"]))
    first_moved = not all(torch.equal(x, y) for x, y in zip(callback.initial, callback.after_first))
    result = {
        "params_unchanged": unchanged,
        "scale_backed_off": a["scale"] == 0.5 * b["scale"],
        "scheduler_not_stepped": a["scheduler_step"] == b["scheduler_step"],
        "other_steps_taken": first_moved and int(trainer.lr_scheduler.last_epoch) == 2,
        "scale_before": b["scale"],
        "scale_after": a["scale"],
        "grad_scaler": type(trainer.accelerator.scaler).__name__,
    }
    result["passed"] = all(result[k] for k in ("params_unchanged", "scale_backed_off", "scheduler_not_stepped",
                                               "other_steps_taken"))  # fmt: skip
    return result


def host_sync(ctx: Any) -> dict[str, Any]:
    """A non-diagnostic GR step (bf16 on CUDA) reads nothing back to the host."""
    precision = "bf16" if ctx.cuda else "fp32"
    trainer, model, batch = _prepared_trainer(ctx, precision, dropout=0.1)

    def gr_step() -> None:
        trainer._gr_plan = None
        trainer.training_step(model, dict(batch))

    def stock_step() -> None:
        Trainer.training_step(trainer, model, dict(batch))

    gr_step()  # warm-up: lazy allocations, library handles
    stock_step()
    model.zero_grad(set_to_none=True)
    with count_host_syncs() as gr_counts:
        gr_step()
    model.zero_grad(set_to_none=True)
    with count_host_syncs() as stock_counts:
        stock_step()
    result: dict[str, Any] = {"python_reads_gr_step": gr_counts["n"], "python_reads_stock_step": stock_counts["n"],
                              "precision": precision}  # fmt: skip
    if ctx.cuda:
        model.zero_grad(set_to_none=True)
        result["cuda_sync_debug_gr_step"] = _sync_debug(gr_step)
        model.zero_grad(set_to_none=True)
        result["cuda_sync_debug_stock_step"] = _sync_debug(stock_step)
        gr, stock = result["cuda_sync_debug_gr_step"], result["cuda_sync_debug_stock_step"]
        # GR must add no sync of its own: a sync the stock step makes as well is the Trainer's, not GR's
        result["passed"] = gr_counts["n"] == 0 and (gr == "ok" or gr == stock)
    else:
        result["cuda_sync_debug_gr_step"] = result["cuda_sync_debug_stock_step"] = "not applicable: no CUDA"
        result["passed"] = gr_counts["n"] == 0
    return result


def previous_step_host_sync(ctx: Any) -> dict[str, Any]:
    """One-pass SAM (`gr_ascent_direction="previous_step"`) in a plain loop (fused AdamW and bf16 autocast on CUDA):
    a GR step along D, with the optimizer step whose hook keeps the next D, reads nothing back to the host beyond
    what the same loop's plain step reads, and takes one pass."""
    from hf_gr import GradientRegularizer, GRArguments

    dims = ctx.sizes.check_dims
    model = make_vit(dims, dropout=0.1, zero_head=False).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.cuda)
    args = GRArguments(gr_lambda=GR_R, gr_r=GR_R, gr_warmup_strategy="none", gr_ascent_direction="previous_step")
    regularizer = GradientRegularizer(model, args=args, optimizer=optimizer)
    batch = {k: v.to(ctx.device) for k, v in stack_rows(random_rows(dims, 8, seed=3)).items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.cuda else contextlib.nullcontext()
    forwards = []

    def loss() -> torch.Tensor:
        forwards.append(1)
        with autocast:
            return model(**batch).loss

    def gr_step() -> None:
        regularizer.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def stock_step() -> None:
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    gr_step()  # no D yet: two passes; it sets D
    gr_step()  # the one-pass path, warmed up
    stock_step()
    forwards.clear()
    with count_host_syncs() as counts:
        gr_step()
    passes = len(forwards)
    with count_host_syncs() as stock_counts:  # the optimizer's own reads (a non-fused AdamW reads its step count)
        stock_step()
    result: dict[str, Any] = {"python_reads_gr_step": counts["n"], "python_reads_stock_step": stock_counts["n"],
                              "passes": passes}  # fmt: skip
    same_reads = counts["n"] == stock_counts["n"] and passes == 1
    if ctx.cuda:
        result["cuda_sync_debug_gr_step"] = _sync_debug(gr_step)
        result["cuda_sync_debug_stock_step"] = _sync_debug(stock_step)
        gr, stock = result["cuda_sync_debug_gr_step"], result["cuda_sync_debug_stock_step"]
        result["passed"] = same_reads and (gr == "ok" or gr == stock)
    else:
        result["cuda_sync_debug_gr_step"] = result["cuda_sync_debug_stock_step"] = "not applicable: no CUDA"
        result["passed"] = same_reads
    return result


def _sync_debug(step: Callable[[], Any]) -> str:
    """ "ok", or the error `torch.cuda.set_sync_debug_mode("error")` raised at a synchronizing call."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "ok"
    except RuntimeError as error:
        return f"sync: {str(error).splitlines()[0][:300]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def multi_device_norm(ctx: Any) -> dict[str, Any]:
    """`squared_norm` over gradients split across devices (and dtypes) against a float64 sum on the CPU."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (10, 64), (7,), (128, 16)]
    tensors = [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(shapes)]
    want = float(sum((t.double() ** 2).sum() for t in tensors))
    layouts: dict[str, list[torch.Tensor]] = {}
    if ctx.cuda:
        layouts["cuda_then_cpu"] = [t.cuda() if i % 2 == 0 else t for i, t in enumerate(tensors)]
        layouts["cpu_then_cuda"] = [t if i % 2 == 0 else t.cuda() for i, t in enumerate(tensors)]
    layouts["cpu_mixed_dtypes"] = [t.to(torch.float64) if i % 2 else t for i, t in enumerate(tensors)]
    results = {}
    for name, grads in layouts.items():
        got = gradient.squared_norm(grads)
        results[name] = {"rel_err": finite_or_none(abs(float(got) - want) / want), "result_device": str(got.device),
                         "devices": sorted({str(t.device) for t in grads})}  # fmt: skip
    passed = all(r["rel_err"] is not None and r["rel_err"] < 1e-5 for r in results.values())
    return {"passed": passed, "layouts": results,
            "note": None if ctx.cuda else "CPU only: one device, mixed dtypes"}  # fmt: skip


# ---- FSDP2, in its own process (torch.distributed.run, world size 1) ----


def fsdp2_worker(ctx: Any, out_path: Path) -> None:
    """One fp32 GR step through GRTrainer with FSDP2 (`fsdp_version: 2`) against float64, measuring the diagnostics
    (their sums over ranks run on the device: an NCCL group reduces no CPU tensor); writes a JSON file.

    On CPU the Trainer ignores FSDP (accelerate shards only on accelerators): the step then runs as a world-size-1
    torchrun job, and the result says so.
    """
    result: dict[str, Any] = {"passed": False}
    try:
        dims = ctx.sizes.check_dims
        rows = random_rows(dims, ctx.sizes.check_batch)
        model = make_vit(dims, dropout=0.0, zero_head=False)
        want, _ = reference_grads(model, stack_rows(rows), GR_LAMBDA, GR_R, ctx.device)
        fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}} if ctx.cuda else {}
        capture = CaptureGrads(0)
        args = ctx.training_args(max_steps=1, per_device_train_batch_size=len(rows), optim="sgd", learning_rate=0.1,
                                 max_grad_norm=1e9, gr_lambda=GR_LAMBDA, gr_r=GR_R, gr_diagnostics_steps=1,
                                 logging_steps=1, **fsdp)  # fmt: skip
        with no_tf32():
            trainer = GRTrainer(model=model, args=args, train_dataset=rows, callbacks=[capture])
            result.update(fsdp_enabled=bool(trainer.is_fsdp_enabled),
                          is_fsdp2=bool(getattr(trainer.accelerator, "is_fsdp2", False)),
                          distributed_type=str(trainer.accelerator.distributed_type),
                          world_size=int(trainer.args.world_size))  # fmt: skip
            trainer.train()
        from torch.distributed.tensor import DTensor

        sharded = [n for n, p in trainer.model.named_parameters() if isinstance(p, DTensor)]
        err = rel_err(capture.grads, want)
        tolerance = FP32_TOLERANCE[ctx.device.type]
        logged = [e for e in trainer.state.log_history if "gr_cosine" in e]
        diagnostics = {k: logged[0].get(k) if logged else None for k in ("gr_grad_norm", "gr_perturbed_grad_norm",
                                                                          "gr_cosine")}  # fmt: skip
        finite = all(v is not None and math.isfinite(v) for v in diagnostics.values())
        result.update(rel_err=finite_or_none(err), tolerance=tolerance, dtensor_params=len(sharded),
                      gr_step_passed=bool(err <= tolerance), diagnostics=diagnostics,
                      diagnostics_logged=finite)  # fmt: skip
        result["passed"] = result["gr_step_passed"] and result["diagnostics_logged"] and (
            not ctx.cuda or (result["is_fsdp2"] and len(sharded) > 0))  # fmt: skip
        if not ctx.cuda:
            result["note"] = "CPU: FSDP needs CUDA; checked the GR step in a world-size-1 torchrun job only"
    except Exception as error:  # recorded, not raised: the parent reports it
        result["error"] = f"{type(error).__name__}: {str(error)[:500]}"
    if int(os.environ.get("RANK", "0")) == 0:
        out_path.write_text(json.dumps(result, indent=1, default=str))
