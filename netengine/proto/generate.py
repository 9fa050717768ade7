"""Regenerate ``netengine/proto/caffe_pb2.py`` from ``proto/caffe.proto``.

Usage: ``python -m netengine.proto.generate`` (needs grpcio-tools, which
bundles ``protoc``; the generated module itself only needs ``protobuf``).
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = PROTO_DIR / "caffe.proto"


def _protoc():
    try:
        from grpc_tools import protoc
    except ImportError:
        return None
    return protoc


def protoc_args(*extra: str) -> list[str]:
    """Arguments for grpc_tools.protoc compiling caffe.proto (no imports)."""
    return ["protoc", f"-I{PROTO_DIR}", *extra, str(PROTO_FILE)]


def generate(out_dir: Path = PACKAGE_DIR) -> Path:
    protoc = _protoc()
    if protoc is None:
        raise RuntimeError(
            "grpcio-tools is required to regenerate caffe_pb2.py: pip install grpcio-tools"
        )
    rc = protoc.main(protoc_args(f"--python_out={out_dir}"))
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc} on {PROTO_FILE}")
    return Path(out_dir) / "caffe_pb2.py"


def main() -> int:
    try:
        path = generate()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
