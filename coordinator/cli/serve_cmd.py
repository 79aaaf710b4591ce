"""serve: an OpenAI-compatible HTTP endpoint in front of one store."""

import argparse
import sys

from .engine_args import add_engine_arguments, open_engine


def register(commands) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a store over an OpenAI-compatible HTTP API (streaming, metrics)",
        description="Serve a packed store over HTTP: POST /v1/completions and /v1/chat/completions (stream or not), "
        "GET /v1/models, /health and /metrics (Prometheus). One request generates at a time; others wait in a "
        "bounded queue. Listens on 127.0.0.1 unless told otherwise.",
    )
    add_engine_arguments(parser)
    parser.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT",
                        help="address to listen on (default 127.0.0.1:8000; port 0 picks a free one)")
    parser.add_argument("--api-key-file", metavar="FILE",
                        help="a file holding the key that clients must send as 'Authorization: Bearer KEY'")
    parser.add_argument("--insecure", action="store_true",
                        help="allow listening on a non-loopback address without --api-key-file")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests that may wait while one generates; more get HTTP 429 (default 16)")
    parser.add_argument("--model-name", metavar="NAME", help="the model's name in the API (default: the store folder's name)")
    parser.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                        help="tokens to generate for a request that sets no max_tokens (default 256, capped by the context)")
    parser.add_argument("--max-request-bytes", type=int, default=4 << 20, metavar="N",
                        help="largest request body taken; a larger one gets HTTP 413 before it is read "
                        "(default 4194304, 4 MiB)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.server.api_key import read_api_key
    from coordinator.server.serve import check_settings, serve

    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    check_settings(listen=args.listen, api_key=api_key, insecure=args.insecure, max_queue=args.max_queue,
                   default_max_tokens=args.default_max_tokens, max_request_bytes=args.max_request_bytes)  # before the model loads
    with open_engine(args, progress=sys.stderr.isatty()) as engine:
        serve(engine=engine, listen=args.listen, api_key=api_key, max_queue=args.max_queue,
              model_name=args.model_name, default_max_tokens=args.default_max_tokens, insecure=args.insecure,
              max_request_bytes=args.max_request_bytes)
    return 0
