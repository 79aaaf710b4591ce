"""Only here to generate the gRPC code from proto/ during the install (pip install [-e] .).
Everything else about the package is in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithProto(build_py):
    def run(self):
        spec = importlib.util.spec_from_file_location("_generate", ROOT / "common" / "rpc" / "generate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(ROOT / "proto", ROOT / "common" / "rpc")
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
