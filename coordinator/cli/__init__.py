"""`python -m coordinator COMMAND`: thin entry points. Each command module adds its arguments
and calls one typed function; errors of ours become one line on stderr and an exit code."""

from __future__ import annotations

import argparse

from . import bench_cmd, bench_fetch_cmd, generate_cmd, make_synthetic_cmd, make_tiny_model_cmd, pack_cmd, serve_cmd, top_cmd

COMMANDS = [make_tiny_model_cmd, pack_cmd, generate_cmd, serve_cmd, top_cmd, make_synthetic_cmd, bench_cmd, bench_fetch_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator",
        description="moe-edge coordinator: pack Mixtral-family checkpoints and generate with the experts off the GPU.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from common.cli_errors import run_command

    return run_command(build_parser().parse_args(argv))
