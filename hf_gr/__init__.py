"""hf_gr: gradient regularization (GR) and its warmup strategies for the Hugging Face Trainer."""

from .arguments import GRTrainingArguments
from .callbacks import GRStepState, GRWarmupCallback, LambdaWarmupCallback, RWarmupCallback, ZeroWarmupCallback
from .diagnostics import GRDiagnosticsCallback
from .trainer import GRTrainer

__all__ = [
    "GRDiagnosticsCallback",
    "GRStepState",
    "GRTrainer",
    "GRTrainingArguments",
    "GRWarmupCallback",
    "LambdaWarmupCallback",
    "RWarmupCallback",
    "ZeroWarmupCallback",
]

__version__ = "0.1.0"
