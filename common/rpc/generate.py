"""Generate the gRPC Python code from proto/*.proto into this package.

    python -m common.rpc.generate

The install runs this too (setup.py). grpc_tools emits `import expert_host_pb2` in the
*_pb2_grpc.py file, a bare import that breaks inside a package (grpc/grpc#29390); we rewrite it
to a relative import here, the one place the generated code is made."""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def generate(proto_dir: Path, out_dir: Path = PACKAGE_DIR) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise SystemExit(f"{proto_dir}: no .proto files")
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for proto in protos:
        stem = proto.stem
        grpc_file = out_dir / f"{stem}_pb2_grpc.py"
        text = grpc_file.read_text()
        text = re.sub(rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as", text, flags=re.M)
        grpc_file.write_text(text)
        written += [out_dir / f"{stem}_pb2.py", grpc_file]
    return written


def main() -> int:
    proto_dir = PACKAGE_DIR.parent.parent / "proto"
    for path in generate(proto_dir):
        print(f"generated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
