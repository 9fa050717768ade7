"""upgrade_net: rewrite a legacy (V0/V1) net in the current format (Caffe's
upgrade_net_proto_text / upgrade_net_proto_binary).

    tools/upgrade_net IN OUT

IN may be a prototxt or a binary caffemodel (detected by content); OUT is written in the same
form (text or binary). Applies the steps of :mod:`netengine.formats.upgrade` (V0 → V1 with padding
layers folded, V1 → V2, data-layer transform fields, net-level inputs → Input layer, BatchNorm
param blocks). Comments are not kept (as in Caffe). Exit status 0 on success (also when the
file was already current: it is then copied as parsed), 1 with a one-line reason otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from google.protobuf import message as pb_message
from google.protobuf import text_format

from netengine.cli import one_line_errors, parse_caffe_args
from netengine.errors import NetEngineError
from netengine.formats import upgrade
from netengine.formats.prototxt import SourceMap, layer_blocks, parse_text, write_atomic
from netengine.proto import caffe_pb2


def read_any(path: str, message) -> tuple[object, bool, SourceMap]:
    """Parse ``path`` as binary or text; returns (message, is_binary, source map)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise NetEngineError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        try:
            message.ParseFromString(data)
            return message, True, SourceMap(path, [])
        except pb_message.DecodeError:
            raise NetEngineError(f"{path} is neither a prototxt nor a binary "
                                 f"{message.DESCRIPTOR.name}") from None
    parse_text(text, message, path)
    return message, False, SourceMap(path, layer_blocks(text))


def write_like(path: str, message, binary: bool) -> None:
    write_atomic(path, message.SerializeToString() if binary
                 else text_format.MessageToString(message))


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="upgrade_net",
                                     description="Write a V0/V1 net (prototxt or caffemodel) "
                                                 "in the current format.")
    parser.add_argument("input", help="legacy net prototxt or caffemodel")
    parser.add_argument("output", help="where to write the upgraded net (same form as input)")
    args = parse_caffe_args(parser, argv)
    try:
        param, binary, source = read_any(args.input, caffe_pb2.NetParameter())
        needed = upgrade.net_needs_upgrade(param)
        keyword = "layers" if len(param.layers) else "layer"
        upgrade.upgrade_net(param, source.lines(keyword), args.input, notify=lambda _: None)
        write_like(args.output, param, binary)
    except NetEngineError as err:
        print(f"upgrade_net: error: {err}", file=sys.stderr)
        return 1
    print(f"upgrade_net: wrote {args.output}" + ("" if needed else
                                                 " (the input was already up to date)"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
