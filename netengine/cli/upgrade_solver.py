"""upgrade_solver: rewrite a legacy solver in the current format (Caffe's
upgrade_solver_proto_text).

    tools/upgrade_solver IN OUT

Turns the deprecated ``solver_type: ADAM`` enum into ``type: "Adam"`` (and upgrades an inline
``net_param``/``train_net_param``/``test_net_param``). Exit status 0 on success (also when the
file was already current), 1 with a one-line reason otherwise.
"""
from __future__ import annotations

import argparse
import sys

from netengine.cli import one_line_errors, parse_caffe_args
from netengine.cli.upgrade_net import read_any, write_like
from netengine.errors import NetEngineError
from netengine.formats import upgrade
from netengine.proto import caffe_pb2


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="upgrade_solver",
                                     description="Write a legacy solver in the current format.")
    parser.add_argument("input", help="legacy solver prototxt")
    parser.add_argument("output", help="where to write the upgraded solver")
    args = parse_caffe_args(parser, argv)
    notes = []
    try:
        param, binary, _ = read_any(args.input, caffe_pb2.SolverParameter())
        upgrade.upgrade_solver(param, args.input, notify=notes.append)
        write_like(args.output, param, binary)
    except NetEngineError as err:
        print(f"upgrade_solver: error: {err}", file=sys.stderr)
        return 1
    print(f"upgrade_solver: wrote {args.output}" + ("" if notes else
                                                    " (the input was already up to date)"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
