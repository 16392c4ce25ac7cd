"""`tinygen sample`: continue a prompt with a trained model, streaming the text to stdout.

    tinygen sample --model runs/shakespeare --prompt "ROMEO:" --max-new-tokens 200 --top-p 0.9 --seed 1
    tinygen sample --model gpt2 --adapter my-peft-lora --prompt "Hello"     # a PEFT adapter over its base
    tinygen sample --model runs/fim --prompt "def area(r):" --suffix "    return a" --temperature 0

--model is any run directory (tinygen.runs: a checkpoint, a fine-tuning run
of any method, a PEFT adapter directory); --adapter puts an adapter on it;
--base says where the base of a fine-tuning run or PEFT adapter is now.

Each sample prints the prompt and then its continuation as it is generated;
generation ends at the tokenizer's <|endoftext|>, at a --stop string, or after
--max-new-tokens tokens. --num-beams > 1 runs beam search instead (no
sampling options; it prints the --num-samples best beams when it is done).
--suffix infills instead (a model pretrained with --fim-rate > 0): the
prompt becomes <|fim_prefix|> PROMPT <|fim_suffix|> SUFFIX <|fim_middle|>,
the model writes the middle until end-of-text, and the command prints
PROMPT + middle + SUFFIX. A masked language model cannot sample at all.
Bad input (an empty or too long prompt, an option out of range) is one line
on stderr and exit code 2.
"""
import sys

from ..beam import beam_search
from ..config import NON_NEGATIVE, POSITIVE, require
from ..errors import TinygenError
from ..gpt import GPT
from ..runs import load_tokenizer
from ..sampling import check_sampling_options, make_rng, require_causal, stream
from .flags import add_model_arguments


def add_parser(sub):
    p = sub.add_parser(
        "sample",
        help="generate text from a trained model, streamed to stdout",
        description="Continue --prompt with the model and tokenizer of a run directory. Sampling "
        "options act in Hugging Face transformers' order: repetition penalty, temperature, top-k, "
        "top-p, min-p (see docs/sampling.md).",
    )
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the text to continue (<|endoftext|> is allowed)")
    p.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate at most (default: 100)")
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy; <1 sharper, >1 flatter (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only (0: no limit, as in transformers)")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens whose probabilities add up to p (0, 1]")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than min-p times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages tokens already in the text (1.2 is typical)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default: 1, sampling)")
    p.add_argument("--num-samples", type=int, default=1, help="how many continuations to print (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: random)")
    p.add_argument("--min-new-tokens", type=int, default=None, metavar="N",
                   help="end-of-text cannot end a sample before N new tokens (Hugging Face's min_new_tokens)")
    p.add_argument("--suffix", default=None, metavar="TEXT",
                   help="infill: write what goes between --prompt and TEXT (a model trained with --fim-rate > 0); "
                   "prints prompt, middle and suffix")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the generated text contains TEXT, printed without it (repeatable; e.g. "
                   "--stop $'\\n\\n'); with --num-beams the text is cut there after the search")
    p.set_defaults(run=run)


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def _encode_prompt(tokenizer, model, text):
    if not text:
        raise TinygenError("--prompt is empty: give some text to continue (or '<|endoftext|>' to start a fresh document)")
    ids = tokenizer.encode(text, allowed_special="all")
    block = model.config.block_size
    if len(ids) > block:
        raise TinygenError(f"--prompt is {len(ids)} tokens, more than the model's context of {block}: shorten it")
    if max(ids) >= model.config.vocab_size:
        raise TinygenError(f"the tokenizer's id {max(ids)} is outside the model's vocabulary of {model.config.vocab_size}: "
                           "are the model and tokenizer from the same run?")
    return ids


def _infill_ids(tokenizer, model, args):
    """--prompt and --suffix as a fill-in-the-middle prompt (PSM), checked like a prompt."""
    from ..fim import FIM_MIDDLE, fim_ids, infill_prompt

    try:
        fim_ids(tokenizer)
    except TinygenError:
        raise TinygenError(f"--suffix needs a model trained for fill-in-the-middle (tinygen pretrain --fim-rate R > 0); "
                           f"{args.model}'s tokenizer has no {FIM_MIDDLE} token") from None
    ids = infill_prompt(tokenizer, args.prompt, args.suffix)
    if len(ids) > model.config.block_size:
        raise TinygenError(f"--prompt and --suffix are {len(ids)} tokens with the fill-in-the-middle markers, more "
                           f"than the model's context of {model.config.block_size}: shorten them")
    if max(ids) >= model.config.vocab_size:
        raise TinygenError(f"the tokenizer's id {max(ids)} is outside the model's vocabulary of {model.config.vocab_size}: "
                           "are the model and tokenizer from the same run?")
    return ids


def _check_args(args):

    require("--max-new-tokens", args.max_new_tokens, NON_NEGATIVE)
    if args.min_new_tokens is not None:
        require("--min-new-tokens", args.min_new_tokens, NON_NEGATIVE)
    if args.suffix is not None and args.num_beams > 1:
        raise TinygenError("--suffix infills by sampling; it does not combine with --num-beams")
    require("--num-samples", args.num_samples, POSITIVE)
    require("--num-beams", args.num_beams, POSITIVE)
    if args.num_beams > 1:
        given = [f"--{f.replace('_', '-')}" for f in SAMPLING_FLAGS if getattr(args, f) is not None]
        if given:
            raise TinygenError(f"--num-beams {args.num_beams} is beam search, which does not sample: drop {', '.join(given)}")
        if args.num_samples > args.num_beams:
            raise TinygenError(f"--num-samples ({args.num_samples}) cannot exceed --num-beams ({args.num_beams})")
    if args.stop is not None and not all(args.stop):
        raise TinygenError("--stop needs a non-empty text")
    check_sampling_options(**{f: getattr(args, f) for f in SAMPLING_FLAGS if getattr(args, f) is not None})


def run(args) -> int:

    _check_args(args)
    # One loader for every run directory; LoRA is merged, so decoding takes the fast path.
    model = GPT.from_pretrained(args.model, adapter=args.adapter, base=args.base, merged=True)
    require_causal(model.config, "tinygen sample")
    tokenizer = load_tokenizer(args.model, adapter=args.adapter, base=args.base)
    ids = _encode_prompt(tokenizer, model, args.prompt) if args.suffix is None else _infill_ids(tokenizer, model, args)
    stops = list(args.stop or []) + ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
    out = sys.stdout
    if args.num_beams > 1:
        return _run_beams(args, model, tokenizer, ids, stops, out)
    rng = make_rng(args.seed)  # one generator for all samples: each differs, all reproducible
    options = {f: getattr(args, f) for f in SAMPLING_FLAGS[:-1] if getattr(args, f) is not None}
    if args.min_new_tokens is not None:
        options["min_new_tokens"] = args.min_new_tokens
    for i in range(args.num_samples):
        if i:
            out.write("\n" + "-" * 40 + "\n")
        out.write(args.prompt)
        out.flush()
        for piece in stream(model, tokenizer, ids, args.max_new_tokens, stop=stops, seed=rng, **options):
            out.write(piece)
            out.flush()
        out.write(args.suffix or "")
        out.write("\n")
    out.flush()
    return 0


def _run_beams(args, model, tokenizer, ids, stops, out):

    result = beam_search(model, ids, args.max_new_tokens, args.num_beams, eos_id=tokenizer.eot_id,
                         num_return_sequences=args.num_samples, min_new_tokens=args.min_new_tokens or 0)
    texts = [s for s in stops if isinstance(s, str)]
    for i in range(args.num_samples):
        new = result.ids[i, len(ids):len(ids) + result.lengths[i]].tolist()
        if new and new[-1] == tokenizer.eot_id:
            new = new[:-1]
        text = tokenizer.decode(new)
        cut = min([j for j in (text.find(s) for s in texts) if j >= 0], default=len(text))
        if i:
            out.write("-" * 40 + "\n")
        out.write(f"{args.prompt}{text[:cut]}\n")
    out.flush()
    return 0
