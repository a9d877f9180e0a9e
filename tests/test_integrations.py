"""GR in other trainers and argument classes: `GRMixin` before any Trainer subclass, `GRArguments` with any
`TrainingArguments` subclass (either base order), and `Seq2SeqTrainer` on a tiny encoder-decoder."""

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import (
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_gr import GRArguments, GRMixin

from gr_testing import DictDataset, TinyNet, grads_of, max_rel_err, reference_gr_grad

# ---- a user's Trainer subclass with its own compute_loss ----


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared distance of the true class's probability from 1: not the model's own loss."""
    return (logits.softmax(-1).gather(1, labels[:, None]) - 1).pow(2).mean()


class UsersTrainer(Trainer):
    """A user's trainer: its own loss, no `super().compute_loss`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(x=inputs["x"])
        loss = margin_loss(outputs["logits"], inputs["labels"])
        return (loss, outputs) if return_outputs else loss


class MyTrainer(GRMixin, UsersTrainer):
    pass


@dataclass
class MyArgs(GRArguments, TrainingArguments):
    my_temperature: float = field(default=1.0, metadata={"help": "The user's own field."})


@dataclass
class MyArgsReversed(TrainingArguments, GRArguments):
    my_temperature: float = field(default=1.0, metadata={"help": "The user's own field."})


def _args(cls, tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                    disable_tqdm=True, gr_warmup_strategy="none", seed=0)  # fmt: skip
    defaults.update(overrides)
    return cls(**defaults)


@pytest.mark.parametrize("args_cls", [MyArgs, MyArgsReversed])
def test_users_trainer_with_own_compute_loss_matches_reference(tmp_path, args_cls):
    model = TinyNet(dropout=0.3)
    batch = DictDataset(16).batch(0, 16)
    trainer = MyTrainer(model=model, args=_args(args_cls, tmp_path, gr_lambda=0.05, gr_r=0.1))
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(3)
    trainer.training_step(model, dict(batch))
    assert model.forward_calls == 2
    want = reference_gr_grad(model, batch, 0.05, 0.1, loss_fn=lambda out, b: margin_loss(out["logits"], b["labels"]),
                             seed=3)  # fmt: skip
    assert max_rel_err(grads_of(model), want) < 1e-5


@pytest.mark.parametrize("args_cls", [MyArgs, MyArgsReversed])
@pytest.mark.parametrize("name, value", [("gr_lambda", -1.0), ("gr_r", 0.0), ("gr_warmup_strategy", "linear")])
def test_gr_validation_runs_whatever_the_base_order(tmp_path, args_cls, name, value):
    with pytest.raises(ValueError, match=name):
        _args(args_cls, tmp_path, **{name: value})


@pytest.mark.parametrize("args_cls", [MyArgs, MyArgsReversed])
def test_parser_reads_gr_flags_beside_the_users_fields(tmp_path, args_cls):
    parser = HfArgumentParser(args_cls)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--gr_lambda", "0.2", "--gr_r", "0.05",
         "--gr_warmup_strategy", "lambda", "--gr_warmup_steps", "7", "--my_temperature", "2.5",
         "--learning_rate", "0.003"]
    )  # fmt: skip
    assert (args.gr_lambda, args.gr_r, args.gr_warmup_strategy, args.gr_warmup_steps) == (0.2, 0.05, "lambda", 7)
    assert (args.my_temperature, args.learning_rate, args.gr_alpha) == (2.5, 0.003, pytest.approx(4.0))
    with pytest.raises(ValueError, match="gr_lambda"):
        parser.parse_dict({"output_dir": str(tmp_path), "use_cpu": True, "gr_lambda": -0.5})


# ---- Seq2SeqTrainer with a tiny T5 ----


@dataclass
class GRSeq2SeqArgs(GRArguments, Seq2SeqTrainingArguments):
    pass


class GRSeq2SeqTrainer(GRMixin, Seq2SeqTrainer):
    pass


VOCAB, EOS, PAD = 24, 1, 0


class ReverseDataset(torch.utils.data.Dataset):
    """Token sequences of varying length and their reversal (T5-style: pad 0, eos 1)."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            src = torch.randint(2, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
            self.rows.append({"input_ids": src + [EOS], "labels": src[::-1] + [EOS]})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    """Right padding: inputs with PAD (and an attention mask), labels with -100."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [PAD] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


def make_t5(seed: int = 0, dropout: float = 0.0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                      num_heads=2, dropout_rate=dropout, pad_token_id=PAD, eos_token_id=EOS,
                      decoder_start_token_id=PAD)  # fmt: skip
    return T5ForConditionalGeneration(config)


def seq2seq_reference(model, batch, gr_lambda, gr_r):
    """(1 − α)·g1 + α·g2 of the token-mean cross-entropy, from the logits."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def grad_at(point):
        leaves = {n: p.clone().requires_grad_(True) for n, p in point.items()}
        logits = functional_call(model, leaves, args=(), kwargs=batch).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        return list(torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))

    g1 = grad_at(params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in g1 if g is not None))
    g2 = grad_at({n: p + (gr_r / norm).float() * g for (n, p), g in zip(params.items(), g1)})
    alpha = gr_lambda / gr_r
    return [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)]


def _seq2seq_args(tmp_path, **overrides):
    # gradient_accumulation_steps=1: in transformers 5.24 T5/Bart take `num_items_in_batch` but average their loss
    # per micro-batch, and the Trainer then skips its division by the accumulation steps (#37766).
    defaults = dict(
        output_dir=str(tmp_path / "s2s"), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, gr_lambda=0.05, gr_r=0.1,
        gr_warmup_strategy="none", seed=0, remove_unused_columns=False,
    )  # fmt: skip
    defaults.update(overrides)
    return GRSeq2SeqArgs(**defaults)


class GradientAtStep(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters() if p.requires_grad])


def test_seq2seq_gr_step_matches_reference(tmp_path):
    model, reference = make_t5(), make_t5()
    data = ReverseDataset(8)
    args = _seq2seq_args(tmp_path, max_steps=1, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant")
    trainer = GRSeq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
    recorder = GradientAtStep()
    trainer.add_callback(recorder)
    trainer.train()  # one batch: the whole dataset, in some order; the mean loss does not depend on it
    want = seq2seq_reference(reference, collate([data[i] for i in range(8)]), 0.05, 0.1)
    assert max_rel_err(recorder.grads[0], want) < 1e-5


def test_seq2seq_short_training_with_gr(tmp_path):
    model = make_t5(dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _seq2seq_args(tmp_path, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=2,
                         gr_warmup_strategy="zero", gr_warmup_steps=2, predict_with_generate=True,
                         generation_max_length=8, per_device_eval_batch_size=8)  # fmt: skip
    trainer = GRSeq2SeqTrainer(model=model, args=args, train_dataset=ReverseDataset(32), data_collator=collate,
                               eval_dataset=ReverseDataset(8, seed=1))  # fmt: skip
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert [e["gr_lambda"] for e in trainer.state.log_history if "loss" in e] == [0.0, 0.05, 0.05]
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # every parameter trained
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    generated = trainer.predict(ReverseDataset(4, seed=2)).predictions
    assert generated.shape[0] == 4
