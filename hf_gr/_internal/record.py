"""Which GR settings ran over which optimizer steps, kept in the Trainer's checkpoints for resumes and model cards.

A run resumed with other settings (a new λ, another warmup) is two runs in one: `GRSettingsRecord` keeps one
segment per setting in force, `{"first_step", "last_step", **settings}` (optimizer steps, 1-based, inclusive). It is
a transformers `ExportableState`, so the Trainer writes it into each checkpoint's `trainer_state.json`
(`stateful_callbacks`); on resume `start` reads it back from there, extends the last segment when nothing changed,
opens a new one otherwise, and says what changed.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerState
from transformers.trainer_callback import ExportableState

# What decides the GR gradient of a step; `gr_warmup_steps` is the W in effect (resolved from the LR warmup if unset).
SETTINGS = (
    "gr_lambda",
    "gr_r",
    "gr_warmup_strategy",
    "gr_warmup_steps",
    "gr_method",
    "gr_first_term",
    "gr_interval",
    "gr_probability",
    "gr_reuse",
    "gr_sync_perturbation",
    "gr_ascent_fraction",
    "gr_probability_end",
    "gr_ascent_direction",
)


def settings_of(args: Any, warmup_steps: int) -> dict[str, Any]:
    """The GR settings of `args`, with W (`gr_warmup_steps`) as the run resolves it."""
    settings = {name: getattr(args, name) for name in SETTINGS}
    settings["gr_warmup_steps"] = warmup_steps
    return settings


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`name: old → new` for each setting that differs (settings an older record lacks are not compared)."""
    return [f"{name}: {old[name]!r} → {new[name]!r}" for name in SETTINGS if name in old and old[name] != new[name]]


class GRSettingsRecord(TrainerCallback, ExportableState):
    """The GR settings of a run with the optimizer steps each ran for, saved in every checkpoint.

    Args:
        segments (`list[dict]`, *optional*):
            `{"first_step", "last_step", **settings}` per setting in force, in step order.
    """

    def __init__(self, segments: list[dict[str, Any]] | None = None) -> None:
        self.segments = [dict(s) for s in segments or []]

    def state(self) -> dict[str, Any]:
        return {"args": {"segments": [dict(s) for s in self.segments]}, "attributes": {}}

    def start(self, state: TrainerState, settings: dict[str, Any]) -> list[str]:
        """Begin training at `state.global_step` with `settings`, continuing the record a resumed checkpoint holds.

        Returns the settings that differ from those the checkpoint's last steps ran with (`changes`).
        """
        step = state.global_step
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if step > 0 else None
        if isinstance(saved, list):  # several records: the Trainer keeps a list; the last is this run's
            saved = saved[-1]
        ran = [dict(s) for s in (saved or {}).get("args", {}).get("segments", []) if s["first_step"] <= step]
        for segment in ran:
            segment["last_step"] = min(segment["last_step"], step)
        changed = changes(ran[-1], settings) if ran else []
        if ran and not changed:
            ran[-1]["last_step"] = step
        else:
            ran.append({"first_step": step + 1, "last_step": step, **settings})
        self.segments = ran
        if state.stateful_callbacks is not None:  # a checkpoint from before the record: the Trainer's save expects it
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        return changed

    def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        if self.segments:
            self.segments[-1]["last_step"] = state.global_step
