"""make-synthetic: a store of real model shapes with random weights, for benchmarks."""

import argparse


def register(commands) -> None:
    # The torch-free table, so that --help does not load torch.
    from coordinator.tools.synthetic_shapes import SHAPES

    parser = commands.add_parser(
        "make-synthetic",
        help="write a store of real shapes (e.g. Mixtral-8x7B, Qwen3-30B-A3B, GLM-4.5-Air, gpt-oss-20b, DeepSeek-V3) "
        "with random weights, for benchmarks",
        description="Write a store in exactly the layout `pack` writes, with random quantized codes and plausible "
        "scales: timing does not depend on weight values (routing does, and comes from these random weights).",
    )
    # Not argparse choices: an unknown name is one line of ours (exit 2) naming the shapes there are.
    parser.add_argument("--shape", required=True, metavar="NAME", help=f"model shape: {', '.join(SHAPES)}")
    parser.add_argument("--out", required=True, metavar="STORE", help="store folder to create")
    parser.add_argument("--expert-bits", type=int, choices=(16, 4, 3, 2), default=None,
                        help="bits per expert weight, HQQ (16: bf16, unquantized); default 2, except for the gpt-oss "
                        "shapes, whose experts are then MXFP4 as the published checkpoints store them and pack keeps "
                        "them (4.25 bits); a width given for gpt-oss writes HQQ experts, as pack makes from a bf16 copy")
    parser.add_argument("--dense-bits", type=int, choices=(16, 4), default=4, help="bits of attention projections (default 4)")
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    parser.add_argument("--layers", type=int, metavar="N",
                        help="keep only the model's first N layers (its dense-layer rule kept), for stores that would "
                        "not fit the disk; figures of a cut model are per layer (default: all layers)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.tools.synthetic_shapes import layers_kept

    layers_kept(args.shape, args.layers)  # before torch's seconds of imports
    from coordinator.tools.synthetic import make_synthetic_store

    summary = make_synthetic_store(shape=args.shape, out=args.out, expert_bits=args.expert_bits,
                                   dense_bits=args.dense_bits, group_size=args.group_size, layers=args.layers,
                                   seed=args.seed, progress=not args.quiet)
    print(summary.line())
    return 0
