"""make-tiny-model OUT: a small random checkpoint of a supported family and a tokenizer, no downloads."""

import argparse

from common.model_config import FAMILY_NAMES


def register(commands) -> None:
    parser = commands.add_parser(
        "make-tiny-model",
        help="write a small random checkpoint (transformers' own config and model classes) and a tokenizer to OUT",
        description="Write a small random checkpoint folder (config.json, model.safetensors, tokenizer files) of a "
        "supported family to OUT, made with transformers' own classes. No downloads.",
    )
    parser.add_argument("--family", choices=FAMILY_NAMES, default="mixtral",
                        help="the model family (default mixtral); the others have a dense layer or shared experts where "
                        "the family has them, and spread routers so routing is no near tie")
    parser.add_argument("out", metavar="OUT", help="folder to create (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.tools.tiny_model import make_tiny_model

    out = make_tiny_model(args.out, family=args.family, seed=args.seed, num_layers=args.layers, num_experts=args.experts)
    print(f"wrote a tiny random {args.family} model ({args.layers} layers, {args.experts} experts per MoE layer) to {out}")
    return 0
