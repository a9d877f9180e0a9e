"""Run under `torchrun --nproc_per_node 2`: GR on a model whose routing flips between the two passes.

`RoutedNet` sends every input to expert 0 while its `gate` is positive and to expert 1 otherwise; its loss pulls
`gate` down hard, so GR's perturbation ε = r·g1/‖g1‖ moves it past 0 on every replica: expert 0 is only in pass 1's
graph, expert 1 only in pass 2's, and `unused` is in neither. Writes, from rank 0, a `torch.save` dict to argv[1]:
- DDP through `GRTrainer` (gloo, `find_unused_parameters=True` as the Trainer sets it for such a model): each
  optimizer step's gradients just before `optimizer.step()`, per-replica and synced perturbation, accumulation 1
  and 2; the synced run takes AdamW with weight decay and records the `unused` layer;
- FSDP2 (`fully_shard` per expert and at the root) through `GradientRegularizer`: the gathered gradients.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_gr import GradientRegularizer, GRArguments  # noqa: E402

from gr_testing import DictDataset, SequentialGRTrainer, finish_distributed, make_args  # noqa: E402

WORLD, BATCH, LAMBDA, R = 2, 4, 0.05, 0.1
PULL = 20.0  # d(loss)/d(gate) ≈ −PULL dominates ‖g1‖, so the perturbation moves gate by ≈ −r: 0.05 → ≈ −0.05


class RoutedNet(nn.Module):
    """x → tanh(inp) → tanh(deep) → expert 0 if gate > 0 else expert 1 → logits; loss = cross-entropy − PULL·gate.

    With `exit_by_data`, `deep` runs only for a batch whose inputs sum to more than 0 (an early exit that depends
    on the data, so replicas differ: of the first 4 batches of 4 rows, batches 1 and 2 take it)."""

    def __init__(self, exit_by_data: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.exit_by_data = exit_by_data
        self.inp = nn.Linear(6, 8)
        self.deep = nn.Linear(8, 8)
        self.experts = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])
        self.unused = nn.Linear(8, 3)
        self.gate = nn.Parameter(torch.tensor([0.05]))
        self.config = PretrainedConfig()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.inp(x))
        if not self.exit_by_data or x.sum() > 0:
            h = torch.tanh(self.deep(h))
        expert = self.experts[0] if self.gate.sum() > 0 else self.experts[1]
        logits = expert(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels) - PULL * self.gate.sum()
        return out


class CaptureGrads(TrainerCallback):
    """Each optimizer step's gradients by name (None where a parameter has none), just before the update."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.steps = model, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append(
            {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.model.named_parameters()}
        )


def run_ddp(tmp: str, name: str, exit_by_data: bool = False, **overrides) -> dict:
    """GRTrainer over DDP; SGD with lr 0 unless `optim` is given (the gradients are what is compared)."""
    values = dict(optim="sgd", learning_rate=0.0, weight_decay=0.0, max_steps=1, gr_lambda=LAMBDA)
    args = make_args(
        _Path(tmp), output_dir=os.path.join(tmp, name), per_device_train_batch_size=BATCH, logging_strategy="no",
        lr_scheduler_type="constant", max_grad_norm=0.0, gr_r=R, **{**values, **overrides},
    )  # fmt: skip
    model = RoutedNet(exit_by_data)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    capture = CaptureGrads(model)
    trainer = SequentialGRTrainer(model=model, args=args, train_dataset=DictDataset(48), callbacks=[capture])
    trainer.train()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, final)
    return {
        "grads": capture.steps,
        "initial": initial,
        "final": final,
        "final_per_rank": every_rank,
        "find_unused_parameters": bool(getattr(trainer.model_wrapped, "find_unused_parameters", False)),
    }


def run_fsdp2(accumulation: int, alpha: float) -> dict:
    """One optimizer step of `GradientRegularizer` on the FSDP2-sharded model; rank r takes rows r·B:(r+1)·B."""
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    model = RoutedNet()
    for expert in model.experts:
        fully_shard(expert)
    fully_shard(model)
    arguments = GRArguments(gr_lambda=alpha * R, gr_r=R, gr_warmup_strategy="none")
    regularizer = GradientRegularizer(model, args=arguments, gradient_accumulation_steps=accumulation)
    data = DictDataset(48)
    for micro in range(accumulation):  # the gradients of one optimizer step, summed in `.grad`
        batch = data.batch((micro * WORLD + rank) * BATCH, BATCH)
        regularizer.backward(lambda batch=batch: model(**batch)["loss"] / accumulation)
    return {n: None if p.grad is None else p.grad.full_tensor().detach().clone() for n, p in model.named_parameters()}


class _Path(str):
    def __truediv__(self, other):
        return _Path(os.path.join(self, other))


def main() -> None:
    out, tmp = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {"world_size": dist.get_world_size()}
    results["fsdp2_ga1"] = run_fsdp2(1, 0.5)
    results["fsdp2_ga2"] = run_fsdp2(2, 0.5)
    results["fsdp2_ga1_sam"] = run_fsdp2(1, 1.0)
    results["ddp_ga1"] = run_ddp(tmp, "ddp_ga1")
    results["ddp_ga2"] = run_ddp(tmp, "ddp_ga2", gradient_accumulation_steps=2)
    results["ddp_sam"] = run_ddp(tmp, "ddp_sam", gr_lambda=R)  # α = 1: g1 is not kept
    # AdamW with weight decay: the `unused` layer must keep `.grad = None`, so that it does not move
    results["ddp_sync"] = run_ddp(
        tmp, "ddp_sync", gr_sync_perturbation=True, optim="adamw_torch", learning_rate=1e-3, weight_decay=0.1,
        max_steps=3,
    )  # fmt: skip
    # `deep` in one replica's graphs only: DDP averages it, and the synced g1 reaches the replica without it
    results["ddp_data_ga1"] = run_ddp(tmp, "ddp_data_ga1", exit_by_data=True)
    results["ddp_data_ga2"] = run_ddp(tmp, "ddp_data_ga2", exit_by_data=True, gradient_accumulation_steps=2)
    results["ddp_data_sync"] = run_ddp(tmp, "ddp_data_sync", exit_by_data=True, gr_sync_perturbation=True)
    try:  # without find_unused_parameters DDP cannot reduce expert 0 (no g2): a clear error, not a later hang
        run_ddp(tmp, "ddp_used_only", ddp_find_unused_parameters=False)
        results["ddp_used_only_error"] = ""
    except RuntimeError as error:
        results["ddp_used_only_error"] = str(error)
    finish_distributed(results, out)


if __name__ == "__main__":
    main()
