"""The fine-tuning methods as one table: a row says all the run needs to know about a method.

    method   trains                    adds                          attaches (Parts -> Parts)       saved as             merges             PEFT type
    full     every parameter but the   nothing                       nothing                         model.safetensors    -                  -
             frozen embeddings/blocks
    lora     *.lora_A, *.lora_B        A (C_in, r), B (r, N) per     linear <- lora_linear(spec,     adapter.safetensors  w + (alpha/r) A B  LORA
                                       target projection, B = 0        linear)
    adapter  h.*.adapter_*             down, up per branch, up = 0   branch <- ADAPTER               adapter.safetensors  -                  -
    prompt   prompt.weight             P (n, C) from n token rows    embed <- prompt_embed(embed)    adapter.safetensors  -                  PROMPT_TUNING

Each function takes the run's FinetuneConfig `fc`, which holds every
method's hyperparameters. A method with a PEFT type is also written (and
read) in Hugging Face PEFT's adapter layout (tinygen.finetuning.peft); the
bottleneck adapters have no PEFT equivalent and keep tinygen's file only. A new method is a new module with its part(s)
and one new row; tinygen.finetuning.finetune never asks which method it runs.
"""
from typing import Callable, NamedTuple, Optional

from ..parts import Parts
from .adapters import ADAPTER, init_adapters
from .lora import LoraSpec, init_lora, lora_linear, merge as lora_merge
from .prompt_tuning import NAME as PROMPT, init_prompt, prompt_embed


class Method(NamedTuple):
    name: str
    lr: float  # the default peak learning rate
    trainable: Callable  # (fc) -> predicate(name) -> bool: the parameters AdamW updates
    init: Callable  # (params, config, fc, rng) -> {name: array}: the parameters it adds, their update 0 at init
    attach: Callable  # (parts: Parts, fc) -> Parts: the model's parts with the method's
    whole_model: bool  # saved as a whole model (True) or as its own tensors only, over the base (False)
    merge: Optional[Callable]  # (params, fc) -> the params of a plain GPT-2 computing the same; None: it cannot
    peft_type: Optional[str] = None  # the PEFT library's name for it (adapter_config.json's peft_type); None: none


def lora_spec(fc) -> LoraSpec:
    """LoRA's hyperparameters from the run's config ("c_attn, c_fc" -> ("c_attn", "c_fc"))."""
    targets = tuple(t.strip() for t in fc.lora_targets.split(",") if t.strip())
    return LoraSpec(fc.lora_rank, fc.lora_alpha, fc.lora_dropout, targets)


def full_trainable(fc):
    """Every parameter, except wte/wpe with freeze_embeddings and blocks below freeze_layers.

    wte is also the tied LM head: freezing the embeddings freezes the head.
    """
    def trainable(name: str) -> bool:
        if fc.freeze_embeddings and name in ("wte.weight", "wpe.weight"):
            return False
        return not (name.startswith("h.") and int(name.split(".")[1]) < fc.freeze_layers)
    return trainable


def no_parts(parts: Parts, fc) -> Parts:
    return parts


FULL = Method(
    "full", 1e-3,
    trainable=full_trainable,
    init=lambda params, config, fc, rng: {},
    attach=no_parts,
    whole_model=True,
    merge=None,  # nothing to merge: it is a plain GPT-2 already
)
LORA = Method(
    "lora", 3e-3,
    trainable=lambda fc: lambda name: name.endswith((".lora_A", ".lora_B")),
    init=lambda params, config, fc, rng: init_lora(params, lora_spec(fc), rng),
    attach=lambda parts, fc: parts._replace(linear=lora_linear(lora_spec(fc), parts.linear)),
    whole_model=False,
    merge=lambda params, fc: lora_merge(params, lora_spec(fc)),
    peft_type="LORA",
)
ADAPTERS = Method(
    "adapter", 3e-3,
    trainable=lambda fc: lambda name: ".adapter_" in name,
    init=lambda params, config, fc, rng: init_adapters(config.n_layer, config.n_embd, fc.adapter_size, rng,
                                                       config.np_dtype),
    attach=lambda parts, fc: parts._replace(branch=ADAPTER),
    whole_model=False,
    merge=None,  # the GELU between down and up is not linear: nothing to fold
)
PROMPT_TUNING = Method(
    "prompt", 3e-2,
    trainable=lambda fc: lambda name: name == PROMPT,
    init=lambda params, config, fc, rng: init_prompt(params["wte.weight"], fc.n_virtual, rng),
    attach=lambda parts, fc: parts._replace(embed=prompt_embed(parts.embed)),
    whole_model=False,
    merge=None,  # extra positions are not a weight of GPT-2
    peft_type="PROMPT_TUNING",
)

METHODS = {m.name: m for m in (FULL, LORA, ADAPTERS, PROMPT_TUNING)}
