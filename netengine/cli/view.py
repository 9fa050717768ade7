"""view: look at a net in the browser (Netscope / draw_net for netengine).

    tools/view NET.prototxt [--phase TRAIN|TEST] [-o NET.html] [--input-shape data=1,3,224,224]
               [--level N] [--stage S] [--no-dot]

Writes one self-contained HTML file (styles and script inline, no network): layers as boxes
coloured by family with their type and top shapes, blobs as edges, in-place layers dashed,
the automatic Split layers hidden; hover or click a layer for its ``*_param`` fields,
parameter count and multiply-adds; the header gives the net's totals. The layout is Graphviz's
``dot`` where it is installed (``--no-dot``: never), else a layered list.

Exit status: 0 when the page is written; 1 when the net is refused (one line: file, line,
layer and why); 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from netengine import summary
from netengine.cli import parse_caffe_args, run, stages
from netengine.errors import DataSourceError, NetEngineError
from netengine.formats.prototxt import write_atomic
from netengine.html import net_view


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="view", description="Draw a net prototxt as a self-contained HTML page with its "
                                 "blob shapes, parameters and multiply-adds.")
    parser.add_argument("model", metavar="NET", help="net prototxt (V0/V1 are upgraded first)")
    parser.add_argument("--phase", default="TEST", choices=list(summary.PHASES),
                        help="which phase's layers to draw (default TEST)")
    parser.add_argument("-o", "--output", default="",
                        help="the HTML file to write (default: NET's name with .html, here)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="stand-in shape for top NAME of a data/input layer (repeatable)")
    parser.add_argument("--level", type=int, default=0, help="NetState level (default 0)")
    parser.add_argument("--stage", action="append", default=[],
                        help="NetState stage(s): comma-separated and/or the flag repeated")
    parser.add_argument("--no-dot", action="store_true",
                        help="use the layered-list layout even where Graphviz is installed")
    return parse_caffe_args(parser, argv)


def view(args) -> int:
    logging.getLogger("netengine").setLevel(logging.WARNING)  # not the net's setup lines
    shapes = dict(summary.parse_shape_spec(s) for s in args.input_shape)
    try:
        net = summary.build(args.model, summary.PHASES[args.phase], shapes or None,
                            level=args.level, stages=stages(args.stage))
    except DataSourceError as err:
        raise NetEngineError(f"{err} (give the data layer's tops stand-in shapes: "
                             "--input-shape NAME=N,C,H,W)") from None
    out = Path(args.output or Path(args.model).with_suffix(".html").name)
    write_atomic(out, net_view.build_page(net, use_dot=not args.no_dot))
    print(f"Wrote the view of net '{net.name}' to {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(lambda: view(args))


if __name__ == "__main__":
    sys.exit(main())
