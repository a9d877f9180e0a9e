"""hf_gr: gradient regularization (GR) and its warmup strategies for the Hugging Face Trainer and Accelerate."""

from .arguments import GRArguments, GRTrainingArguments
from .callbacks import GRWarmupCallback, LambdaWarmupCallback, RWarmupCallback, ZeroWarmupCallback
from .diagnostics import GRDiagnosticsCallback
from .regularizer import GradientRegularizer
from .trainer import GRMixin, GRTrainer

__all__ = [
    "GRArguments",
    "GRDiagnosticsCallback",
    "GRMixin",
    "GRTrainer",
    "GRTrainingArguments",
    "GRWarmupCallback",
    "GradientRegularizer",
    "LambdaWarmupCallback",
    "RWarmupCallback",
    "ZeroWarmupCallback",
]

__version__ = "0.2.0"
