"""plot_log: chart training logs (Caffe's tools/extra/plot_training_log.py), with matplotlib.

    tools/plot_log CHART_TYPE OUT.png LOG [LOG ...]

Chart types: 0 Test accuracy vs. Iters, 1 Test accuracy vs. Seconds, 2 Test loss vs. Iters,
3 Test loss vs. Seconds, 4 Train learning rate vs. Iters, 5 Train learning rate vs. Seconds,
6 Train loss vs. Iters, 7 Train loss vs. Seconds. Every log (and, in a net with several loss or
accuracy outputs, every such output) is one curve. The image format follows OUT's suffix.
Needs matplotlib (``pip install matplotlib``); without it, one line and exit status 1.
"""
from __future__ import annotations

import argparse
import sys

from netengine.cli import parse_caffe_args
from netengine.errors import NetEngineError
from netengine.formats import caffe_log


def _chart_list() -> str:
    return "; ".join(f"{k}: {caffe_log.chart_title(k)}" for k in caffe_log.CHART_TYPES)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="plot_log", description="Plot training logs: " + _chart_list() + ".")
    parser.add_argument("chart_type", type=int, choices=sorted(caffe_log.CHART_TYPES),
                        metavar="CHART_TYPE", help="0-7 (see above)")
    parser.add_argument("out", metavar="OUT", help="image to write (.png, .svg, .pdf, ...)")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="training log file(s)")
    return parse_caffe_args(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        curves = caffe_log.plot_logs(args.chart_type, args.out, args.logs)
    except NetEngineError as err:
        print(f"plot_log: error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {args.out} ({caffe_log.chart_title(args.chart_type)}, "
          f"{len(curves)} curve{'s' if len(curves) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
