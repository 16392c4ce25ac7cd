"""FinetuneConfig: a fine-tuning run's method, its hyperparameters, the optimization and the data.

One frozen dataclass, validated by tinygen.config's one helper, written into
every fine-tuning run (finetune.json, and the metadata of adapter.safetensors)
so a run can be reloaded and reproduced from its own files. It sits below
the loader (tinygen.runs) and the pipeline (tinygen.finetuning.finetune),
which both read it; the pipeline turns it into the shared loop's TrainConfig.
"""
from dataclasses import asdict, dataclass
from typing import Optional

from ..config import NON_NEGATIVE, POSITIVE, PROBABILITY, boolean, number, one_of, option, optional, validate
from .lora import TARGETS
from .methods import METHODS


def names_among(choices):
    """A check: a comma-separated string of one or more of `choices`.

    >>> names_among(TARGETS)("c_attn, c_fc"), names_among(TARGETS)("q_proj")
    (None, "comma-separated names among 'c_attn', 'c_proj', 'c_fc'")
    """
    def check(value):
        names = [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else []
        ok = names and all(t in choices for t in names)
        return None if ok else "comma-separated names among " + ", ".join(map(repr, choices))
    return check


def text(value) -> Optional[str]:
    """A check: a string."""
    return None if isinstance(value, str) else "a string"


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run: the method, its hyperparameters, the optimization and the data."""

    method: str = option("lora", "what to train: " + ", ".join(METHODS), one_of(*METHODS))
    freeze_embeddings: bool = option(False, "full: keep wte/wpe (and so the tied LM head) frozen", boolean)
    freeze_layers: int = option(0, "full: keep the lowest N blocks frozen", NON_NEGATIVE)
    lora_rank: int = option(8, "lora: rank r of each update A B", POSITIVE)
    lora_alpha: float = option(16.0, "lora: the update is scaled by alpha / r", number(0.0, low_open=True))
    lora_dropout: float = option(0.0, "lora: dropout on the update's input", PROBABILITY)
    lora_targets: str = option("c_attn,c_proj,c_fc", "lora: comma-separated projections among c_attn, c_proj, c_fc",
                               names_among(TARGETS))
    adapter_size: int = option(16, "adapter: bottleneck width m", POSITIVE)
    n_virtual: int = option(8, "prompt: number of virtual tokens", POSITIVE)
    tasks: str = option("", "comma-separated tasks to train and evaluate; empty means all", text)
    batch_size: int = option(16, "examples per step", POSITIVE)
    max_steps: int = option(300, "optimizer steps (with --resume: continue up to this step)", NON_NEGATIVE)
    lr: Optional[float] = option(None, "peak learning rate; None picks the method's: "
                                 + ", ".join(f"{m.name} {m.lr:g}" for m in METHODS.values()),
                                 optional(number(0.0, low_open=True)))
    warmup_steps: int = option(20, "steps of linear warm-up", NON_NEGATIVE)
    weight_decay: float = option(0.0, "AdamW weight decay of the trained 2-D weights", number(0.0))
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", number(0.0))
    dropout: float = option(0.0, "dropout probability while training", PROBABILITY)
    eval_interval: int = option(50, "steps between validation-loss measurements", POSITIVE)
    eval_batches: int = option(4, "validation batches per measurement", POSITIVE)
    checkpoint_interval: int = option(100, "steps between checkpoints", POSITIVE)
    eval_examples: int = option(64, "test examples per task decoded for the accuracy", NON_NEGATIVE)
    seed: int = option(0, "seed of the new weights and the batch order", NON_NEGATIVE)
    workers: int = option(0, "threads that each run a shard of every batch (0 = one per core; 1 = one stream)",
                          NON_NEGATIVE)
    fim_rate: float = option(0.0, "fill-in-the-middle: the share of training examples (prompt + completion) "
                             "rearranged to infill their middle; needs a base pretrained with --fim-rate > 0",
                             number(0.0, 1.0))

    def __post_init__(self):
        validate(self)

    @property
    def learning_rate(self) -> float:
        return METHODS[self.method].lr if self.lr is None else self.lr

    def task_list(self) -> tuple:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    def to_dict(self) -> dict:
        return asdict(self)
