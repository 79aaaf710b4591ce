"""What every kernel check module (tests/*_check.py) does with its seed: print the command that
reruns it on the same inputs, first, and take DEVICE [SEED] from its command line (a fresh seed
unless given, so each run by hand draws new inputs; the tests give conftest.check_seed()). Not
collected by pytest (no test_ prefix)."""

from __future__ import annotations

import random
import sys

import torch


def seeded(module: str, device: str, seed: int) -> torch.Generator:
    """Print the rerun line of `module` (python -m name) for this device and seed; the generator
    of its inputs."""
    interpreter = "TRITON_INTERPRET=1 " if device == "cpu" else ""
    print(f"seed {seed} (rerun: {interpreter}python -m {module} {device} {seed})")
    return torch.Generator().manual_seed(seed)


def device_and_seed(default_device: str = "cuda") -> tuple[str, int]:
    """DEVICE [SEED] from sys.argv."""
    device = sys.argv[1] if len(sys.argv) > 1 else default_device
    return device, int(sys.argv[2]) if len(sys.argv) > 2 else random.randrange(2**31)
