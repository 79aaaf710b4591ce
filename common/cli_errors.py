"""How every command line of the project ends: our errors become one line on stderr and their
exit code, Ctrl-C becomes 130; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import sys

from .errors import MoeEdgeError


def run_command(args: argparse.Namespace) -> int:
    """Call the command chosen by argparse (`args.run`) and turn its outcome into an exit code."""
    try:
        return args.run(args) or 0
    except MoeEdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
