"""summarize: the one-screen answer to "what does this prototxt compute?".

    tools/summarize --model F [--phase TEST|TRAIN] [--input-shape data=1,3,227,227 ...]
                    [--level N] [--stage S ...] [--show-splits]

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
from netengine.cli import parse_caffe_args
from netengine.errors import DataSourceError, NetEngineError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="summarize",
        description="Per-layer table of a net prototxt: top shapes, parameters, multiply-adds.")
    parser.add_argument("--model", required=True, help="net prototxt (V0/V1/V2)")
    parser.add_argument("--phase", default="TEST", choices=list(summary.PHASES),
                        help="which phase's layers to build (default TEST)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="stand-in shape for top NAME of a data/input layer (repeatable)")
    parser.add_argument("--level", type=int, default=0, help="NetState level (default 0)")
    parser.add_argument("--stage", action="append", default=[], help="NetState stage(s): "
                        "comma-separated and/or the flag repeated")
    parser.add_argument("--show-splits", action="store_true",
                        help="also list the Split layers inserted automatically")
    return parse_caffe_args(parser, argv)


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
        return Verdict(1, f"summarize: refused: {err}{hint}", None, err)
    return Verdict(0, table, net)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shapes = dict(summary.parse_shape_spec(s) for s in args.input_shape)
    except NetEngineError as err:
        print(f"summarize: {err}", file=sys.stderr)
        return 2
    verdict = run(args.model, args.phase, shapes, args.level, cli.stages(args.stage),
                  args.show_splits)
    print(verdict.text, file=sys.stderr if verdict.status else sys.stdout)
    return verdict.status


if __name__ == "__main__":
    sys.exit(main())
