"""The model's one configuration: `GPTConfig`.

Field names follow nanoGPT; `to_hf()` / `from_hf()` translate to the names of
Hugging Face's `GPT2Config` (n_positions, n_ctx, ...), which is what a
checkpoint's config.json holds.
"""
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional

import numpy as np

from .errors import TinygenError

LAYER_NORM_EPS = 1e-5  # GPT-2's layer_norm_epsilon; tinygen.layers.layernorm_forward's default
# config.json's model_type for a model with bidirectional attention (GPTConfig.causal False). It is
# not GPT-2, so it must not pass for one: transformers' Auto classes do not know this type and
# refuse it, and GPT2LMHeadModel warns that the checkpoint is of another type.
BIDIRECTIONAL_MODEL_TYPE = "tinygen_bidirectional"
# config.json of a model with experts: a model type transformers does not know (see to_hf). A model
# with experts AND bidirectional attention is also "tinygen_moe": its "tinygen" object holds every
# field, causal included, so one model type per file is enough.
MOE_MODEL_TYPE, MOE_ARCHITECTURE = "tinygen_moe", "TinygenMoEForCausalLM"


# ------------------------------------------------------------------ one validation helper
# A config dataclass declares each field with `option(default, help, check)`:
# the help text sits beside the field (the command line's --help reads it),
# and `validate(self)` in __post_init__ runs every field's check. A check
# returns None when the value is fine, else what was expected ("a positive integer").

def integer(low: int) -> Callable:
    """A check: an int (bool excluded, NumPy integers included) >= low."""
    def check(value):
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value >= low
        return None if ok else ("a positive integer" if low == 1 else f"an integer >= {low}")
    return check


def number(low: float = -math.inf, high: float = math.inf, low_open=False, high_open=False) -> Callable:
    """A check: a finite real number (bool excluded) in the interval [low, high], ends open as asked."""
    def check(value):
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and _finite(value)
        ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if ok:
            return None
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return "a positive number" if (low, low_open, high) == (0, True, math.inf) else \
            f"a number in {left}{low:g}, {high:g}{right}"
    return check


def _finite(value) -> bool:
    """math.isfinite, and False (not OverflowError) for an int beyond a float's range, like 10**400."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def one_of(*choices) -> Callable:
    """A check: one of the given values."""
    return lambda value: None if value in choices else "one of " + ", ".join(map(repr, choices))


def optional(check: Callable) -> Callable:
    """A check: None, or a value that passes `check`."""
    return lambda value: None if value is None else check(value)


def boolean(value) -> Optional[str]:
    """A check: True or False."""
    return None if isinstance(value, (bool, np.bool_)) else "True or False"


POSITIVE, NON_NEGATIVE = integer(1), integer(0)
PROBABILITY = number(0.0, 1.0, high_open=True)  # a dropout rate: [0, 1)


def option(default, help: str, check: Optional[Callable] = None):
    """A dataclass field with its --help text and its check, read by `validate` and tinygen.cli.flags."""
    return field(default=default, metadata={"help": help, "check": check})


def require(name: str, value, check: Callable):
    """Check one argument of a public function; returns it, or raises TinygenError naming it.

    >>> require("num_beams", 4, POSITIVE)
    4
    >>> require("num_beams", 0, POSITIVE)
    Traceback (most recent call last):
    ...
    tinygen.errors.TinygenError: num_beams must be a positive integer, got 0
    """
    expected = check(value)
    if expected:
        raise TinygenError(f"{name} must be {expected}, got {value!r}")
    return value


def validate(config) -> None:
    """Run the check of every field of a config dataclass; raise TinygenError naming the first bad one.

    >>> validate(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4))
    >>> GPTConfig(vocab_size=8, block_size=4, n_layer=True, n_head=1, n_embd=4)
    Traceback (most recent call last):
    ...
    tinygen.errors.TinygenError: GPTConfig.n_layer must be a positive integer, got True
    """
    for f in fields(config):
        if f.metadata.get("check"):
            require(f"{type(config).__name__}.{f.name}", getattr(config, f.name), f.metadata["check"])


# ------------------------------------------------------------------ the model's shape
@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 model.

    vocab_size V, block_size T (context length), n_layer L, n_head H,
    n_embd C (width; head width D = C // H), dropout p, dtype of parameters
    and activations ("float32" or "float64"); causal: GPT-2's masked
    attention (True) or bidirectional attention (False, for masked language
    modelling; tinygen.parts.parts_for picks the attention part).
    """

    vocab_size: int = option(None, "size of the vocabulary V, special tokens included", POSITIVE)
    block_size: int = option(None, "context length T: positions the model sees at once", POSITIVE)
    n_layer: int = option(None, "transformer blocks L", POSITIVE)
    n_head: int = option(None, "attention heads H per block (must divide n_embd)", POSITIVE)
    n_embd: int = option(None, "width C of the residual stream", POSITIVE)
    dropout: float = option(0.0, "dropout probability while training (0 = off)", PROBABILITY)
    dtype: str = option("float32", "float32 or float64 parameters and activations", one_of("float32", "float64"))
    causal: bool = option(True, "causal attention (GPT-2: each position sees only the past); False: every "
                          "position sees every other (a masked language model, BERT's attention)", boolean)
    # mixture of experts (tinygen.moe, docs/moe.md); n_expert=0 is the dense GPT-2
    n_expert: int = option(0, "experts E in each mixture-of-experts block (0 = dense GPT-2, no experts)", NON_NEGATIVE)
    expert_top_k: int = option(2, "experts k each token is routed to (GLaM: 2), at most n_expert", POSITIVE)
    moe_every: int = option(2, "every moe_every-th block has experts: blocks moe_every-1, 2*moe_every-1, ... "
                            "(GLaM: 2, every other block)", POSITIVE)
    aux_loss_coef: float = option(0.01, "weight of the experts' load-balancing loss in the training loss",
                                  number(0.0))
    capacity_factor: Optional[float] = option(None, "each expert takes at most ceil(factor * tokens * k / E) "
                                              "tokens of a training batch, the rest skip the layer "
                                              "(None = no limit)", optional(number(0.0, low_open=True)))

    def __post_init__(self):
        validate(self)
        if self.n_embd % self.n_head:
            raise TinygenError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_expert and self.expert_top_k > self.n_expert:
            raise TinygenError(f"GPTConfig.expert_top_k ({self.expert_top_k}) must be at most "
                               f"n_expert ({self.n_expert}): a token cannot pick more experts than there are")

    def is_moe_block(self, i: int) -> bool:
        """Block i has experts (a router and n_expert MLPs) instead of one MLP: every moe_every-th block.

        >>> [GPTConfig(8, 4, 4, 1, 4, n_expert=2).is_moe_block(i) for i in range(4)]
        [False, True, False, True]
        """
        return self.n_expert > 0 and (i + 1) % self.moe_every == 0

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_hf(self) -> dict:
        """The config.json that `transformers.GPT2LMHeadModel.from_pretrained` reads.

        A bidirectional model (causal False) says what it is instead: model_type
        BIDIRECTIONAL_MODEL_TYPE, which transformers does not load as GPT-2 (GPT-2
        there is causal, and would compute something else with these weights).

        With experts (n_expert > 0) the weights are no GPT-2's, so the file must
        not pass for one: model_type "tinygen_moe", which transformers' Auto
        classes refuse ("does not recognize this architecture"), and the shape
        keys (n_embd, n_layer, ...) only under "tinygen", so that even a forced
        GPT2LMHeadModel.from_pretrained builds GPT-2's default 768-wide model and
        stops on the size mismatch instead of loading with the MLPs missing. That
        holds for a bidirectional model with experts too: "tinygen" holds causal.
        """
        if self.n_expert:
            return {
                "model_type": MOE_MODEL_TYPE,
                "architectures": [MOE_ARCHITECTURE],
                "activation_function": "gelu_new",
                "layer_norm_epsilon": LAYER_NORM_EPS,
                "tie_word_embeddings": True,
                "torch_dtype": self.dtype,
                "tinygen": self.to_dict(),
            }
        causal = self.causal
        return {
            "model_type": "gpt2" if causal else BIDIRECTIONAL_MODEL_TYPE,
            "architectures": ["GPT2LMHeadModel" if causal else "TinygenBidirectionalLM"],
            "activation_function": "gelu_new",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "layer_norm_epsilon": LAYER_NORM_EPS,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "bos_token_id": self.vocab_size - 1,
            "eos_token_id": self.vocab_size - 1,
            "torch_dtype": self.dtype,
            "tinygen": {"dtype": self.dtype, "dropout": self.dropout, "causal": causal},
        }

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "GPTConfig":
        """Read a Hugging Face GPT-2 config.json dict (or one tinygen wrote: bidirectional, with experts).

        Sizes must be JSON integers; anything else (a string, 768.0, true,
        null, a missing field) is a TinygenError naming `where` and the field.
        """
        if not isinstance(hf, dict):
            raise TinygenError(f"{where}: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "gpt2")
        if model_type == MOE_MODEL_TYPE:
            return cls._from_moe_hf(hf, where)
        if model_type not in ("gpt2", BIDIRECTIONAL_MODEL_TYPE):
            raise TinygenError(f"{where}: model_type must be 'gpt2', {BIDIRECTIONAL_MODEL_TYPE!r} (tinygen's "
                               f"bidirectional attention) or {MOE_MODEL_TYPE!r} (tinygen's mixture of experts), "
                               f"got {model_type!r:.60}")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise TinygenError(f"{where}: activation_function {act!r:.60} is not GPT-2's tanh GELU")
        extra = hf.get("tinygen", {})
        if not isinstance(extra, dict):
            raise TinygenError(f"{where}: \"tinygen\" must be an object, got {type(extra).__name__}")
        causal = model_type == "gpt2"
        if extra.get("causal", causal) is not causal:
            raise TinygenError(f"{where}: model_type {model_type!r} and causal={extra.get('causal')!r:.20} (under "
                               f"\"tinygen\") disagree; a {'causal' if causal else 'bidirectional'} model is "
                               f"model_type {'gpt2' if causal else BIDIRECTIONAL_MODEL_TYPE!r}")
        if extra.get("n_expert"):
            raise TinygenError(f"{where}: model_type {model_type!r} with n_expert={extra['n_expert']!r:.20} under 'tinygen': "
                               f"a checkpoint with experts says model_type {MOE_MODEL_TYPE!r}; this file is "
                               "inconsistent, so tinygen will not guess which half is right")
        missing = [k for k in ("vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
        missing += [] if "n_positions" in hf or "n_ctx" in hf else ["n_positions"]
        if missing:
            raise TinygenError(f"{where}: missing field {missing[0]!r}")
        try:
            config = cls(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx")),
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         dropout=extra.get("dropout", 0.0), dtype=extra.get("dtype", "float32"), causal=causal)
        except TinygenError as e:  # "GPTConfig.n_embd must be a positive integer, got '768'": config.json's names
            names = {"GPTConfig.block_size": "n_positions", "GPTConfig.dropout": 'dropout (under "tinygen")',
                     "GPTConfig.dtype": 'dtype (under "tinygen")', "GPTConfig.": ""}
            message = str(e)
            for ours, theirs in names.items():
                message = message.replace(ours, theirs)
            raise TinygenError(f"{where}: {message}") from None
        if hf.get("n_inner") not in (None, 4 * config.n_embd):
            raise TinygenError(f"{where}: n_inner must be 4 * n_embd (GPT-2's MLP width)")
        return config

    @classmethod
    def _from_moe_hf(cls, hf: dict, where: str) -> "GPTConfig":
        """The config.json of a model with experts: every field under "tinygen" (see to_hf)."""
        values = hf.get("tinygen")
        if not isinstance(values, dict):
            raise TinygenError(f"{where}: model_type {MOE_MODEL_TYPE!r} needs a 'tinygen' object "
                               "holding the model's fields")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise TinygenError(f"{where}: unknown field {unknown[0]!r:.60} under 'tinygen'; written by a newer "
                               "tinygen?")
        if not values.get("n_expert"):
            raise TinygenError(f"{where}: model_type {MOE_MODEL_TYPE!r} but n_expert under 'tinygen' is "
                               f"{values.get('n_expert')!r:.20}: a model with experts needs n_expert > 0")
        try:
            return cls(**values)
        except TinygenError as e:  # "GPTConfig.n_embd must be a positive integer, got '128'"
            raise TinygenError(f"{where}: {str(e).replace('GPTConfig.', '')} (under 'tinygen')") from None
