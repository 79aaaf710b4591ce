"""Generated gRPC code (from proto/ by setup.py's build step or `python -m common.rpc.generate`).

Import `expert_host_pb2` / `expert_host_pb2_grpc` from here; they are never edited by hand."""

try:
    from . import expert_host_pb2, expert_host_pb2_grpc  # noqa: F401
except ImportError as err:  # pragma: no cover - a checkout that was never installed
    raise ImportError(
        "the gRPC code is not generated yet: run `pip install -e .` or `python -m common.rpc.generate`"
    ) from err
