"""draw_net: draw a net prototxt as a graph (Caffe's python/draw_net.py).

    tools/draw_net MODEL OUT [--rankdir LR|TB|BT|RL] [--phase TRAIN|TEST|ALL] [--display_lrm]
    tools/draw_net --model MODEL --output OUT [...]

The positional form is Caffe's draw_net.py; ``--model``/``--output`` match the other tools.

OUT's suffix picks the format: .dot/.gv writes DOT text; any other suffix (.png, .svg, .pdf,
...) is rendered by Graphviz's ``dot`` program. Without ``dot`` the DOT text is written next
to OUT (OUT with suffix .dot), a one-line notice says so, and the exit status is still 0:
the graph was produced, only not rendered. Errors (an unreadable net, dot failing) print one
line and exit 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from netengine import draw
from netengine.cli import one_line_errors, parse_caffe_args
from netengine.errors import NetEngineError
from netengine.proto import caffe_pb2

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="draw_net", description="Draw a net prototxt as a graph (PNG, SVG, PDF or DOT).",
        epilog="Without Graphviz's dot program an image request writes OUT with suffix .dot "
               "instead (exit status 0, one-line notice on stderr).")
    parser.add_argument("paths", nargs="*", metavar="MODEL OUT",
                        help="the net prototxt (V0/V1 files are upgraded first) and the output "
                             "file, whose suffix picks the format (.png, .svg, .pdf, .dot, ...)")
    parser.add_argument("--model", default="", help="the net prototxt (instead of MODEL)")
    parser.add_argument("-o", "--output", default="", help="the output file (instead of OUT)")
    parser.add_argument("--rankdir", default="LR", choices=draw.RANKDIRS,
                        help="direction of the graph layout (default LR: left to right)")
    parser.add_argument("--phase", default="ALL", choices=list(PHASES),
                        help="draw only the layers of this phase (default ALL)")
    parser.add_argument("--display_lrm", action="store_true",
                        help="show each learned layer's lr_mult values")
    args = parse_caffe_args(parser, argv)
    paths = list(args.paths)
    args.model = args.model or (paths.pop(0) if paths else "")
    args.out = args.output or (paths.pop(0) if paths else "")
    if paths or not args.model or not args.out:
        parser.error("give the net and the output file: MODEL OUT, or --model M --output O")
    return args


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        net_param = draw.read_net(args.model)
        written = draw.draw_net_to_file(net_param, args.out, rankdir=args.rankdir,
                                        phase=PHASES[args.phase], display_lrm=args.display_lrm)
    except NetEngineError as err:
        print(f"draw_net: error: {err}", file=sys.stderr)
        return 1
    if written != Path(args.out):
        print(f"draw_net: Graphviz 'dot' is not installed: wrote DOT text to {written} instead "
              f"of {args.out} (render it with: dot -T{Path(args.out).suffix[1:]} {written} "
              f"-o {args.out})", file=sys.stderr)
    else:
        print(f"Drawing net to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
