"""One module per `tinygen` subcommand, each with `add_parser(subparsers)` and `run(args)`.

Listed in the order of the story: tokenize, pretrain, fine-tune, sample,
check gradients, and the demo that runs them all.
"""
from . import demo, finetune, gradcheck, pretrain, sample, tokenizer

COMMANDS = [demo, tokenizer, pretrain, finetune, sample, gradcheck]
