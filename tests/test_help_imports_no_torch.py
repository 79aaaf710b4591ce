"""`--help` answers at once: no command line's help (python -m coordinator, python -m
expert_host, and each of their subcommands) imports torch, transformers, grpc, fastapi or
uvicorn, and the top-level help names every subcommand. One fresh interpreter runs them all,
so that nothing the tests imported before counts."""

import json
import subprocess
import sys

from conftest import ROOT

COORDINATOR_COMMANDS = ["make-tiny-model", "pack", "generate", "serve", "top", "make-synthetic", "bench", "bench-fetch"]
EXPERT_HOST_COMMANDS = ["serve", "link-proxy"]
HEAVY_MODULES = ["torch", "transformers", "grpc", "fastapi", "uvicorn"]

# Runs in the child: each --help in turn, then what was imported.
CHILD = """
import argparse, contextlib, io, json, sys
from coordinator.cli import build_parser as coordinator_parser, main as coordinator_main
from expert_host.cli import build_parser as expert_host_parser, main as expert_host_main

def commands(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(action.choices)

def help_of(main, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code in (0, None), (argv, exit.code)
    return out.getvalue()

found = {"commands": {"coordinator": commands(coordinator_parser()), "expert_host": commands(expert_host_parser())},
         "help": {}}
for program, main in (("coordinator", coordinator_main), ("expert_host", expert_host_main)):
    found["help"][program] = help_of(main, ["--help"])
    for command in found["commands"][program]:
        found["help"][program + " " + command] = help_of(main, [command, "--help"])
found["heavy"] = [name for name in HEAVY if name in sys.modules]
print(json.dumps(found))
"""


def test_every_help_imports_no_torch_and_the_top_level_help_names_every_subcommand():
    done = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY_MODULES!r}\n" + CHILD],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["heavy"] == [], f"--help imported {found['heavy']}"
    assert found["commands"] == {"coordinator": sorted(COORDINATOR_COMMANDS), "expert_host": sorted(EXPERT_HOST_COMMANDS)}
    for program, commands in (("coordinator", COORDINATOR_COMMANDS), ("expert_host", EXPERT_HOST_COMMANDS)):
        top = found["help"][program]
        assert top.startswith(f"usage: python -m {program}"), top
        for command in commands:
            assert command in top, f"`python -m {program} --help` does not mention {command}"
            assert found["help"][f"{program} {command}"].startswith(f"usage: python -m {program} {command}")
