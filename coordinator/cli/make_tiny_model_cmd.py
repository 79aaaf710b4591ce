"""make-tiny-model OUT: a small random Mixtral checkpoint and tokenizer, no downloads."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser(
        "make-tiny-model",
        help="write a small random Mixtral (transformers' MixtralConfig) and a tokenizer to OUT",
        description="Write a small random Mixtral checkpoint folder (config.json, model.safetensors, tokenizer files) to OUT. No downloads.",
    )
    parser.add_argument("out", metavar="OUT", help="folder to create (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.tools.tiny_model import make_tiny_model

    out = make_tiny_model(args.out, seed=args.seed, num_layers=args.layers, num_experts=args.experts)
    print(f"wrote a tiny random Mixtral ({args.layers} layers x {args.experts} experts) to {out}")
    return 0
