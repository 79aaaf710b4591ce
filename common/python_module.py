"""Starting `python -m MODULE` as a child process that runs the same code as this process.

The child gets this interpreter and, first on its PYTHONPATH, the folder this process imports
the module's package from: with a checkout next to an older install, or from another working
directory, parent and child still run the same code."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) for `python -m module args...`."""
    spec = importlib.util.find_spec(module.split(".")[0])
    env = dict(os.environ)
    if spec is not None and spec.origin is not None:
        root = str(Path(spec.origin).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", module, *map(str, args)], env
