"""pack: a Hugging Face checkpoint folder or repo id -> a moe-edge store."""

import argparse


def register(commands) -> None:
    parser = commands.add_parser(
        "pack",
        help="pack a Hugging Face Mixtral checkpoint into an expert store",
        description="Read a Hugging Face Mixtral-family checkpoint (config.json, safetensors shards, tokenizer) from a "
        "folder, or from a Hugging Face repo id through huggingface_hub's cache (HF_HOME, HF_HUB_CACHE; downloaded "
        "there first unless --offline or HF_HUB_OFFLINE=1; pickle weights are never downloaded), "
        "and write a moe-edge store: one contiguous blob per expert (HQQ-quantized unless --expert-bits 16), "
        "dense.safetensors, the tokenizer and manifest.json. Never writes over an existing folder or through a "
        "symbolic link; refuses NaN/Inf weights and a disk without room for the store. The store is built in a "
        "hidden .STORE.partial-PID folder beside it, removed on any error, Ctrl-C or SIGTERM. "
        "Exit codes: 2 bad setting, 3 bad checkpoint, a repo id not found or not cached, bad --out, disk full, "
        "130 Ctrl-C, 143 SIGTERM.",
    )
    parser.add_argument("--model", required=True, metavar="HF_DIR|ORG/NAME",
                        help="the checkpoint folder, or a Hugging Face repo id (an existing folder wins)")
    parser.add_argument("--revision", metavar="REV",
                        help="branch, tag or commit hash of the repo id (default main); not for a folder")
    parser.add_argument("--offline", action="store_true",
                        help="read the repo id from the local hub cache only, never the network "
                        "(as HF_HUB_OFFLINE=1)")
    parser.add_argument("--out", required=True, metavar="STORE", help="store folder to create")
    parser.add_argument("--expert-bits", type=int, choices=(16, 4, 3, 2), default=4,
                        help="bits per expert weight; 16 keeps the checkpoint's dtype (default 4)")
    parser.add_argument("--dense-bits", type=int, choices=(16, 4), default=16,
                        help="bits of the attention projections (default 16)")
    parser.add_argument("--group-size", type=int, default=64, help="HQQ group size along the input dimension (default 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (download or packing)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.tools.hub_checkpoint import HubSettings
    from coordinator.tools.pack import pack_checkpoint

    summary = pack_checkpoint(
        model_dir=args.model,
        out=args.out,
        expert_bits=args.expert_bits,
        dense_bits=args.dense_bits,
        group_size=args.group_size,
        progress=not args.quiet,
        hub=HubSettings.from_environment(revision=args.revision, offline=args.offline),
    )
    print(summary.line())
    return 0
