"""The model's one configuration: `GPTConfig`.

Field names follow nanoGPT; `to_hf()` / `from_hf()` translate to the names of
Hugging Face's `GPT2Config` (n_positions, n_ctx, ...), which is what a
checkpoint's config.json holds.
"""
from dataclasses import asdict, dataclass

import numpy as np

from .errors import TinygenError

LAYER_NORM_EPS = 1e-5  # GPT-2's layer_norm_epsilon


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 model.

    vocab_size V, block_size T (context length), n_layer L, n_head H,
    n_embd C (width; head width D = C // H), dropout p, dtype of parameters
    and activations ("float32" or "float64").
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise TinygenError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise TinygenError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise TinygenError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype not in ("float32", "float64"):
            raise TinygenError(f"GPTConfig.dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "GPTConfig":
        return GPTConfig(**{**asdict(self), **changes})

    def to_hf(self) -> dict:
        """The config.json that `transformers.GPT2LMHeadModel.from_pretrained` reads."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
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
            "tinygen": {"dtype": self.dtype, "dropout": self.dropout},
        }

    @classmethod
    def from_hf(cls, hf: dict) -> "GPTConfig":
        """Read a Hugging Face GPT-2 config.json dict (or one tinygen wrote)."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise TinygenError(f"config.json: model_type must be 'gpt2', got {hf.get('model_type')!r}")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise TinygenError(f"config.json: activation_function {act!r} is not GPT-2's tanh GELU")
        if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
            raise TinygenError("config.json: n_inner must be 4 * n_embd (GPT-2's MLP width)")
        extra = hf.get("tinygen", {})
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                block_size=int(hf.get("n_positions", hf.get("n_ctx"))),
                n_layer=int(hf["n_layer"]),
                n_head=int(hf["n_head"]),
                n_embd=int(hf["n_embd"]),
                dropout=float(extra.get("dropout", 0.0)),
                dtype=str(extra.get("dtype", "float32")),
            )
        except (KeyError, TypeError) as e:
            raise TinygenError(f"config.json: missing or malformed field {e}") from None
