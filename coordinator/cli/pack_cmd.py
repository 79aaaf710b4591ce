"""pack: a Hugging Face checkpoint folder -> a moe-edge store."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser(
        "pack",
        help="pack a Hugging Face Mixtral checkpoint into an expert store",
        description="Read a Hugging Face Mixtral-family checkpoint folder (config.json, safetensors shards, tokenizer) "
        "and write a moe-edge store: one contiguous blob per expert (HQQ-quantized unless --expert-bits 16), "
        "dense.safetensors, the tokenizer and manifest.json. Never writes over an existing folder or through a "
        "symbolic link; refuses NaN/Inf weights and a disk without room for the store. The store is built in a "
        "hidden .STORE.partial-PID folder beside it, removed on any error, Ctrl-C or SIGTERM. "
        "Exit codes: 2 bad setting, 3 bad checkpoint or --out, disk full, 130 Ctrl-C, 143 SIGTERM.",
    )
    parser.add_argument("--model", required=True, metavar="HF_DIR", help="the checkpoint folder")
    parser.add_argument("--out", required=True, metavar="STORE", help="store folder to create")
    parser.add_argument("--expert-bits", type=int, choices=(16, 4, 3, 2), default=4,
                        help="bits per expert weight; 16 keeps the checkpoint's dtype (default 4)")
    parser.add_argument("--dense-bits", type=int, choices=(16, 4), default=16,
                        help="bits of the attention projections (default 16)")
    parser.add_argument("--group-size", type=int, default=64, help="HQQ group size along the input dimension (default 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.tools.pack import pack_checkpoint

    summary = pack_checkpoint(
        model_dir=args.model,
        out=args.out,
        expert_bits=args.expert_bits,
        dense_bits=args.dense_bits,
        group_size=args.group_size,
        progress=not args.quiet,
    )
    print(summary.line())
    return 0
