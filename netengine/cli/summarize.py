"""summarize: the one-screen answer to "what does this prototxt compute?".

    tools/summarize --model F [--phase TEST|TRAIN] [--input-shape data=1,3,227,227 ...]
                    [--level N] [--stage S ...] [--show-splits]
    tools/summarize --layers        (every layer type, one line each)

Builds the net (legacy formats are upgraded first; weights are random, nothing is read from a
caffemodel) and prints, per layer: name, type, top shapes, parameter count and multiply-adds,
then the totals. ``--input-shape NAME=D1,D2,...`` gives stand-in shapes that replace the data
or input layer producing top NAME (for nets whose data source is absent, or to try another
input size).

Exit status: 0 when the net builds; 1 when it is refused, with the one-line reason on stderr
(file, line, layer and why: a layer type or field BVLC Caffe does not have, a missing data
source, ...); 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from netengine import cli, summary
from netengine.cli import one_line_errors, parse_caffe_args
from netengine.errors import DataSourceError, NetEngineError
from netengine.layers import REGISTRY, layer_type_list


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="summarize",
        description="Per-layer table of a net prototxt: top shapes, parameters, multiply-adds.")
    parser.add_argument("--model", default="", help="net prototxt (V0/V1/V2)")
    parser.add_argument("--layers", action="store_true",
                        help="list every layer type with its one-line description, and exit")
    parser.add_argument("--phase", default="TEST", choices=list(summary.PHASES),
                        help="which phase's layers to build (default TEST)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="stand-in shape for top NAME of a data/input layer (repeatable)")
    parser.add_argument("--level", type=int, default=0, help="NetState level (default 0)")
    parser.add_argument("--stage", action="append", default=[], help="NetState stage(s): "
                        "comma-separated and/or the flag repeated")
    parser.add_argument("--show-splits", action="store_true",
                        help="also list the Split layers inserted automatically")
    args = parse_caffe_args(parser, argv)
    if not args.layers:
        cli.require(parser, args.model, "give the net to summarize: --model F (or --layers)")
    return args


def layer_list() -> str:
    """Every layer type and the first line of its docstring, one a line."""
    types = layer_type_list()
    width = max(map(len, types))
    return "\n".join(f"{name:<{width}}  {_first_line(REGISTRY[name].__doc__)}" for name in types)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]


@dataclass
class Verdict:
    """What the tool decides for one net: status 0 with the table, or 1 with the reason."""

    status: int
    text: str
    net: object = None
    error: NetEngineError | None = None


def run(model, phase="TEST", input_shapes: dict | None = None, level: int = 0, stages=(),
        show_splits: bool = False) -> Verdict:
    """Build ``model`` and tabulate it, as the command line does (tests call this directly)."""
    phase = summary.PHASES[phase] if isinstance(phase, str) else phase
    try:
        net = summary.build(model, phase, input_shapes or None, level=level, stages=stages)
        table = summary.format_table(summary.summarize(net, show_splits=show_splits))
    except NetEngineError as err:
        hint = (" (give the data layer's tops stand-in shapes: --input-shape NAME=N,C,H,W)"
                if isinstance(err, DataSourceError) else "")
        return Verdict(1, f"summarize: error: {err}{hint}", None, err)
    return Verdict(0, table, net)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.layers:
        print(layer_list())
        return 0
    try:
        shapes = dict(summary.parse_shape_spec(s) for s in args.input_shape)
    except NetEngineError as err:
        print(f"summarize: error: {err}", file=sys.stderr)
        return 2
    verdict = run(args.model, args.phase, shapes, args.level, cli.stages(args.stage),
                  args.show_splits)
    print(verdict.text, file=sys.stderr if verdict.status else sys.stdout)
    return verdict.status


if __name__ == "__main__":
    sys.exit(main())
