"""generate: stream text from a store to stdout."""

import argparse
import json
import sys

from .engine_args import add_engine_arguments, open_engine


def register(commands) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate text from a store, streamed to stdout",
        description="Generate from a packed store with the experts off the GPU, printing text as tokens are made.",
    )
    add_engine_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default 64)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="always take the most likely token (the default)")
    sampling.add_argument("--temperature", type=float, metavar="T",
                          help="sample at this temperature (finite, > 0; below 1e-5 it is greedy) instead of greedy")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling mass, in (0, 1] (default 1.0; only with --temperature)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="seed for sampling: any integer, reduced modulo 2**64 (only with --temperature)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line: token_ids, text, stats")
    parser.add_argument("--record-routing", metavar="FILE",
                        help="write the routing of this generation to FILE (JSON lines: each token's experts per "
                        "layer and the lookahead's guesses; `bench --routing FILE` replays it)")
    parser.set_defaults(run=run)


def sampling_from_args(args: argparse.Namespace):
    """The SamplingParams, checked before the model loads (ConfigError naming the option)."""
    from common.errors import ConfigError
    from coordinator.runtime.sampler import SamplingParams  # imports torch: not at `--help`

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    greedy = args.temperature is None
    sampling = SamplingParams(greedy=greedy, temperature=1.0 if greedy else args.temperature,
                              top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed, as_options=True)
    if greedy and (args.top_p is not None or args.seed is not None):
        # nothing silent: the user asked for something greedy decoding does not use
        print("note: --top-p and --seed apply when sampling (--temperature); greedy decoding ignores them",
              file=sys.stderr)
    return sampling


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    with open_engine(args, progress=sys.stderr.isatty()) as engine:
        recorder = engine.record_routing(made_by=_made_by(args, engine)) if args.record_routing else None
        generation = engine.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            greedy=sampling.greedy,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        for piece in generation:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if recorder is not None:
            recorder.trace().write(args.record_routing)
        stats = generation.stats
        if args.json:
            print(json.dumps({"token_ids": generation.token_ids, "text": generation.text,
                              "finish_reason": generation.finish_reason, "stats": stats.to_dict()}))
        else:
            print(
                f"[{stats.new_tokens} tokens, {stats.tokens_per_s:.2f} tok/s decode, "
                f"hits {stats.cache_hits} misses {stats.cache_misses} prefetch hits {stats.prefetch_hits}]",
                file=sys.stderr,
            )
    return 0


def _made_by(args: argparse.Namespace, engine) -> dict:
    """How a recorded routing trace was made, for its header."""
    options = engine.options
    return {"model": engine.store.manifest.model_id, "store": str(args.store), "command": "generate",
            "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
            "sampling": "greedy" if args.temperature is None else f"temperature {args.temperature}",
            "prefetch": options.prefetch, "device": options.device}
