"""Generated gRPC code (from proto/ by the install, or `python -m common.rpc.generate`).

`from common.rpc import expert_host_pb2, expert_host_pb2_grpc`; never edited by hand."""

import importlib

_GENERATED = ("expert_host_pb2", "expert_host_pb2_grpc")


def __getattr__(name: str):
    if name in _GENERATED:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise ImportError(
                f"{name} is not generated yet: run `pip install -e .` or `python -m common.rpc.generate`"
            ) from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
