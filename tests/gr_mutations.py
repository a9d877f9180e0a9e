"""Deliberate breakages of hf_gr, each patching one function that the library calls through its module or class
(`schedule.plan_step(...)`, `gradient.mix_(...)`, `GradientRegularizer._ends_step`, ...).

`tests/test_mutations.py` applies them with `apply(name, monkeypatch)`. The module is also a pytest plugin, to try
a mutation on any test: `HF_GR_MUTATION=<name> PYTHONPATH=tests python -m pytest -p gr_mutations tests/...` runs
the whole session on the broken library; `HF_GR_MUTATION_REPORT=<path>` then writes a JSON record of how often the
patched function ran and each test's outcome with the type of the exception that failed it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hf_gr import GradientRegularizer
from hf_gr._internal import ascent, combine, gradient, metrics, passes, previous, record, replay, schedule

DEFAULT_R = 0.1  # GRArguments' default gr_r

MUTATIONS = {
    "gr_off": "every GR step runs as a plain step (one pass, g = g1), while λ_t and r_t are still logged",
    "alpha_ignored": "the combination uses α = 1 (SAM: g = g2) whatever λ/r is",
    "radius_ignored": f"the perturbation has the default radius {DEFAULT_R}, whatever gr_r or the r-warmup says",
    "warmup_ignored": "the warmup fraction is always 1: full GR from the first step, for every strategy",
    "reuse_rho_ignores_alpha": "the kept LookSAM ρ is that of the unweighted g2 − g1, not of g_GR − g1 = α·(g2 − g1)",
    "reuse_not_applied": "a reuse step applies no correction: it is a plain step",
    "pass2_not_combined": "pass 2's gradient is dropped where the combination forms g1 + α·(g2 − g1) + A: g = g1 + A",
    "dropout_not_replayed": "pass 2 does not rewind the RNG: it draws other dropout masks than pass 1",
    "ascent_on_the_whole_batch": "sub-batch ascent's pass 1 runs on the whole micro-batch, not its first ⌈f·B⌉ rows",
    "ramp_ignored": "gr_probability_end is ignored: p stays gr_probability for the whole run",
    "sharpness_not_a_rise": "gr_sharpness logs L(θ + ε), not L(θ + ε) − L(θ)",
    "theta_not_restored": "θ is not restored after pass 2: the optimizer steps from θ + ε",
    "every_backward_ends_a_step": "a custom loop's every backward ends an optimizer step, whatever the accumulation",
    "missing_gradient_not_zero": "a gradient missing from one pass is taken to equal the other pass's, not 0",
    "resume_changes_unseen": "a resume with changed GR settings is recorded as if nothing changed",
    "previous_direction_stale": "one-pass SAM steps along the first D it captured, never the latest applied gradient",
    "previous_direction_not_restored": "one-pass SAM leaves θ at θ + ε after its pass",
    "previous_direction_not_saved": "GR's checkpoint state leaves D out: a resumed run's next GR step has no D",
    "previous_direction_kept_after_skip": "after a step the fp16 scaler skipped, the D of the step before is used",
    "previous_direction_not_finite": "a D with NaN or ±inf is kept as it is, not set to 0",
}


class Calls:
    """Counts the calls of a patched function (a mutation that is never reached proves nothing)."""

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return function(*args, **kwargs)

        return counted


def apply(name: str, patch: pytest.MonkeyPatch) -> Calls:
    """Break the library as `MUTATIONS[name]` says, through `patch`; the returned counter counts the broken calls."""
    calls = Calls()
    if name == "gr_off":
        plan_step = schedule.plan_step

        def plain_plan(*args: Any, **kwargs: Any) -> schedule.StepPlan:
            plan = plan_step(*args, **kwargs)
            return schedule.StepPlan(schedule.PLAIN, plan.gr_lambda, plan.gr_r) if plan.kind == schedule.GR else plan

        patch.setattr(schedule, "plan_step", calls.wrap(plain_plan))
    elif name == "alpha_ignored":
        mix_ = gradient.mix_

        def sam_mix(first: Any, second: Any, alpha: float, *rest: Any) -> Any:
            return mix_(first, second, 1.0, *rest)

        patch.setattr(gradient, "mix_", calls.wrap(sam_mix))
    elif name == "radius_ignored":
        perturb_ = gradient.perturb_

        def default_radius(params: Any, grads: Any, r: float, *rest: Any) -> None:
            perturb_(params, grads, DEFAULT_R, *rest)

        patch.setattr(gradient, "perturb_", calls.wrap(default_radius))
    elif name == "warmup_ignored":
        patch.setattr(schedule, "warmup_fraction", calls.wrap(lambda step, warmup_steps: 1.0))
    elif name == "reuse_rho_ignores_alpha":
        plan_step, correction_ = schedule.plan_step, gradient.orthogonal_correction_
        last_alpha = [1.0]

        def recording_plan(*args: Any, **kwargs: Any) -> schedule.StepPlan:
            plan = plan_step(*args, **kwargs)
            if plan.kind == schedule.GR:
                last_alpha[0] = plan.alpha
            return plan

        def unweighted(*args: Any, **kwargs: Any) -> Any:
            # u is the same direction either way; ρ of c = g2 − g1 is ρ of α·(g2 − g1) divided by α
            return correction_(*args, **kwargs) / last_alpha[0]

        patch.setattr(schedule, "plan_step", recording_plan)
        patch.setattr(gradient, "orthogonal_correction_", calls.wrap(unweighted))
    elif name == "reuse_not_applied":
        patch.setattr(gradient, "add_correction_", calls.wrap(lambda *args, **kwargs: None))
    elif name == "pass2_not_combined":

        def first_only(first: Any, second: Any, alpha: float, accumulated: Any = None) -> Any:
            if accumulated is not None:
                first.add_(accumulated)
            return first

        patch.setattr(gradient, "mix_", calls.wrap(first_only))
    elif name == "dropout_not_replayed":
        patch.setattr(replay, "set_rng_state", calls.wrap(lambda state: None))
    elif name == "ascent_on_the_whole_batch":
        patch.setattr(ascent, "ascent_inputs", calls.wrap(lambda inputs, fraction: dict(inputs)))
    elif name == "ramp_ignored":
        patch.setattr(schedule, "ramped_probability", calls.wrap(lambda start, *rest: start))
    elif name == "sharpness_not_a_rise":
        patch.setattr(metrics, "perturbed_loss_rise", calls.wrap(lambda loss, perturbed: perturbed))
    elif name == "theta_not_restored":
        patch.setattr(gradient, "restore_", calls.wrap(lambda params, backup: None))
    elif name == "every_backward_ends_a_step":
        patch.setattr(GradientRegularizer, "_ends_step", calls.wrap(lambda self, sync_gradients: True))
    elif name == "missing_gradient_not_zero":
        combine_ = combine.combine

        def as_the_other(g1: Any, g2: Any, alpha: float, accumulated: Any) -> Any:
            if g1 is None and g2 is not None:
                g1 = g2.clone()  # g = g2 + A, not α·g2 + A
            elif g2 is None and g1 is not None:
                g2 = g1.clone()  # g = g1 + A, not (1 − α)·g1 + A
            return combine_(g1, g2, alpha, accumulated)

        patch.setattr(combine, "combine", calls.wrap(as_the_other))
    elif name == "previous_direction_stale":
        capture_ = previous.PreviousDirection.capture_

        def first_only(self: Any, params: Any) -> None:
            if not self.ready:
                capture_(self, params)

        patch.setattr(previous.PreviousDirection, "capture_", calls.wrap(first_only))
    elif name == "previous_direction_not_restored":
        restore_ = gradient.restore_
        one_pass = passes.GRPasses._one_pass

        def leaving_theta_perturbed(self: Any, run_pass: Any, plan: Any) -> Any:
            patch.setattr(gradient, "restore_", lambda params, backup: None)
            try:
                return one_pass(self, run_pass, plan)
            finally:
                patch.setattr(gradient, "restore_", restore_)

        patch.setattr(passes.GRPasses, "_one_pass", calls.wrap(leaving_theta_perturbed))
    elif name == "previous_direction_not_saved":
        patch.setattr(previous.PreviousDirection, "state_dict", calls.wrap(lambda self: {}))
    elif name == "previous_direction_kept_after_skip":
        patch.setattr(previous.PreviousDirection, "step_ended", calls.wrap(lambda self: None))
    elif name == "previous_direction_not_finite":
        capture_ = previous.PreviousDirection.capture_

        def keeping_non_finite(self: Any, params: Any) -> None:
            capture_(self, params)
            self.flat.copy_(torch.cat([p.grad.reshape(-1) for p in params]))  # D as applied, NaN and all

        patch.setattr(previous.PreviousDirection, "capture_", calls.wrap(keeping_non_finite))
    elif name == "resume_changes_unseen":
        patch.setattr(record, "changes", calls.wrap(lambda old, new: []))
    else:
        raise ValueError(f"the mutation must be one of {', '.join(MUTATIONS)}, got {name!r}.")
    return calls


_patch = pytest.MonkeyPatch()
_calls = Calls()
_outcomes: dict[str, dict[str, str | None]] = {}


def pytest_configure(config: pytest.Config) -> None:
    global _calls
    name = os.environ.get("HF_GR_MUTATION", "")
    if name:
        _calls = apply(name, _patch)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.failed or report.when == "call":
        error = call.excinfo.typename if call.excinfo is not None else None
        if report.failed or item.nodeid not in _outcomes:
            _outcomes[item.nodeid] = {"outcome": report.outcome, "when": report.when, "error": error}
    return report


def pytest_unconfigure(config: pytest.Config) -> None:
    _patch.undo()
    path = os.environ.get("HF_GR_MUTATION_REPORT")
    if path:
        record = {"mutation": os.environ.get("HF_GR_MUTATION", ""), "calls": _calls.count, "tests": _outcomes}
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
