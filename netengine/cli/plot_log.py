"""plot_log: chart training logs (Caffe's tools/extra/plot_training_log.py), with matplotlib.

    tools/plot_log CHART_TYPE OUT.png LOG [LOG ...]
    tools/plot_log LOG --html REPORT.html

Chart types: 0 Test accuracy vs. Iters, 1 Test accuracy vs. Seconds, 2 Test loss vs. Iters,
3 Test loss vs. Seconds, 4 Train learning rate vs. Iters, 5 Train learning rate vs. Seconds,
6 Train loss vs. Iters, 7 Train loss vs. Seconds. Every log (and, in a net with several loss or
accuracy outputs, every such output) is one curve. The image format follows OUT's suffix.
Needs matplotlib (``pip install matplotlib``); without it, one line and exit status 1.

``--html REPORT.html`` (netengine only) writes instead the self-contained HTML training report
of one log (the page ``train --report`` writes: loss, test outputs and learning rate against
iterations, speed, the solver's settings); it needs nothing but netengine.
"""
from __future__ import annotations

import argparse
import sys

from netengine.cli import one_line_errors, parse_caffe_args
from netengine.errors import NetEngineError
from netengine.formats import caffe_log
from netengine.html.run_report import write_log_report


def _chart_list() -> str:
    return "; ".join(f"{k}: {caffe_log.chart_title(k)}" for k in caffe_log.CHART_TYPES)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="plot_log", description="Plot training logs: " + _chart_list() + ".",
        epilog="plot_log LOG --html REPORT.html writes instead the HTML training report of LOG "
               "(no matplotlib needed).")
    parser.add_argument("chart_type", type=int, choices=sorted(caffe_log.CHART_TYPES),
                        metavar="CHART_TYPE", help="0-7 (see above)")
    parser.add_argument("out", metavar="OUT", help="image to write (.png, .svg, .pdf, ...)")
    parser.add_argument("logs", nargs="+", metavar="LOG", help="training log file(s)")
    return parse_caffe_args(parser, argv)


def html_main(argv: list[str]) -> int:
    """``plot_log LOG --html REPORT.html``: the HTML report of one log."""
    parser = argparse.ArgumentParser(prog="plot_log", description="HTML report of a log.")
    parser.add_argument("log", metavar="LOG", help="training log file (Caffe's or netengine's)")
    parser.add_argument("--html", required=True, metavar="REPORT.html", help="page to write")
    args = parser.parse_args(argv)
    try:
        tables = write_log_report(args.log, args.html)
    except NetEngineError as err:
        print(f"plot_log: error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {args.html} ({len(tables.train)} train and {len(tables.test)} test rows)")
    return 0


@one_line_errors
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--html" or a.startswith("--html=") for a in argv):
        return html_main(argv)
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
