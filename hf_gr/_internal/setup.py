"""What a GR trainer checks and binds when it is built: the set-ups the two-pass step cannot run under, the warmup
strategy's callback, and how the step runs (the process layout), for `GRMixin`."""

from __future__ import annotations

import logging
import os
from typing import Any

from accelerate.utils.environment import parse_flag_from_env
from torch import nn

from ..arguments import optimizer_name
from ..callbacks import WARMUP_CALLBACKS, GRWarmupCallback
from . import sync

logger = logging.getLogger("hf_gr.trainer")  # what a GR trainer says at start-up, under the trainer's name


def refuse_unsupported(trainer: Any) -> None:
    """Refuse, at start-up, what the two-pass step cannot run under, naming what to use instead."""
    refuse_a_lone_process_of_many(trainer.accelerator.num_processes)
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            "GR does not support DeepSpeed: its engine steps the optimizer inside backward and ZeRO-2/3 "
            "partitions gradients out of `.grad`, so the two-pass GR gradient cannot be formed. Use DDP "
            "(`accelerate launch --multi_gpu`) or FSDP2 (`fsdp_version: 2`) instead."
        )
    if trainer.is_fsdp_enabled and getattr(trainer.accelerator, "is_fsdp2", False) is not True:
        raise ValueError(
            "GR does not support FSDP1: under FSDP1 the sharded g1 cannot be read per shard. Use FSDP2: "
            "`fsdp_version: 2` in the accelerate config (configs/accelerate/fsdp2.yaml) or "
            "fsdp_config={'fsdp_version': 2}."
        )
    asked = "fsdp in the arguments" if trainer.args.fsdp else None
    if asked is None and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        asked = "the accelerate config"
    if asked and not trainer.is_fsdp_enabled and trainer.is_local_process_zero():
        logger.warning(
            "FSDP was asked for (%s) but the run is %s: accelerate shards only on accelerators (not on CPU or "
            "with use_cpu), so GR runs unsharded.", asked, mode(trainer),
        )  # fmt: skip
    # What the Trainer itself reads (transformers >= 5.24); older versions shard nothing at load time.
    loaded_distributed = getattr(trainer.model, "is_distributed_loading_by_transformers", False)
    if loaded_distributed and not _is_fsdp_only(trainer.model):
        raise ValueError(
            "GR does not support models sharded or tensor-parallel at load time (`tp_plan`/`device_mesh`) "
            "other than plain FSDP2 (`DistributedConfig(fsdp_size=...)` alone): their gradients are reduced "
            "outside the Trainer's `no_sync`. Load the model whole and use DDP or FSDP2."
        )
    optim = optimizer_name(trainer.args)
    if optim in ("lomo", "adalomo") or optim.endswith("layerwise"):
        raise ValueError(
            f"GR does not support optim={optim!r}: it updates the weights inside backward, so GR's first "
            "pass would already step the optimizer. Use an optimizer that steps after backward (e.g. adamw_torch)."
        )
    if trainer.args.gr_method == "exact" and trainer.accelerator.num_processes > 1:
        raise ValueError(
            "gr_method='exact' (double backprop) is a single-process verification tool; use "
            "gr_method='finite_difference' for multi-process training."
        )
    args = trainer.args
    if args.gr_first_term == "normalized" and (args.gradient_accumulation_steps > 1 or args.fp16):
        raise ValueError(
            "gr_first_term='normalized' (the official code's g1/‖g1‖) is defined for one micro-batch without "
            "loss scaling: use gradient_accumulation_steps=1 and no fp16, or gr_first_term='raw'."
        )

def refuse_a_lone_process_of_many(num_processes: int) -> None:
    """A launcher said several processes (WORLD_SIZE > 1) but this one runs alone: it would train the whole model
    on its own, as every other process does, into the same output_dir."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_processes == 1:
        raise ValueError(
            f"WORLD_SIZE={world} says this is one of {world} processes, but it runs as a single process: no process "
            "group was formed (`accelerate launch --multi_gpu` on a machine without visible GPUs does this), so each "
            f"process would train on its own into the same output_dir. On CPUs launch with `torchrun "
            f"--nproc_per_node {world} SCRIPT` and use_cpu=True; on GPUs check that they are visible (nvidia-smi, "
            "CUDA_VISIBLE_DEVICES); for one process, run the script without a launcher."
        )


def bind_warmup_callback(trainer: Any) -> GRWarmupCallback | None:
    """The warmup strategy: one passed in `callbacks` wins over `gr_warmup_strategy`; two are an error."""
    given = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GRWarmupCallback)]
    if len(given) > 1:
        raise ValueError(
            f"{type(trainer).__name__} got {len(given)} GR warmup callbacks "
            f"({', '.join(type(c).__name__ for c in given)}); pass at most one, or set gr_warmup_strategy."
        )
    if given:
        callback = given[0]
        if callback.strategy is None and type(callback).coefficients is GRWarmupCallback.coefficients:
            raise ValueError(
                f"{type(callback).__name__} is not a warmup strategy: pass LambdaWarmupCallback, RWarmupCallback "
                "or ZeroWarmupCallback (or a subclass that defines `coefficients`)."
            )
        if callback.strategy is not None and callback.strategy != trainer.args.gr_warmup_strategy:
            logger.info("Using the %s passed in callbacks instead of gr_warmup_strategy=%r.",
                        type(callback).__name__, trainer.args.gr_warmup_strategy)  # fmt: skip
            trainer.args.gr_warmup_strategy = callback.strategy  # checkpoints and the model card say what ran
        if callback.warmup_steps is not None:
            trainer.args.gr_warmup_steps = callback.warmup_steps
        return callback
    if trainer.args.gr_warmup_strategy in WARMUP_CALLBACKS:
        callback = WARMUP_CALLBACKS[trainer.args.gr_warmup_strategy]()
        trainer.add_callback(callback)
        return callback
    return None


def mode(trainer: Any) -> str:
    """How the GR step runs here: the process layout and where the perturbation's g1 comes from."""
    processes = trainer.accelerator.num_processes
    if processes == 1:
        return "single process"
    if trainer.is_fsdp_enabled or sync.is_sharded([p for p in trainer.model.parameters() if p.requires_grad]):
        return f"FSDP2 over {processes} processes, perturbation synced (FSDP2 reduces g1 across replicas)"
    if trainer.args.gr_sync_perturbation:
        return f"DDP over {processes} processes, perturbation synced (the replica-mean g1, gr_sync_perturbation)"
    return f"DDP over {processes} processes, perturbation per replica (each replica's own g1)"


def _is_fsdp_only(model: nn.Module) -> bool:
    """Whether a model distributed at load time (`from_pretrained(distributed_config=...)`) is only FSDP2-sharded."""
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    if config is None:
        return False
    others = ("tp_size", "pp_size", "ep_size", "dp_replicate_size")
    return all(getattr(config, name, 1) in (None, 1) for name in others) and getattr(config, "fsdp_size", 1) > 1
