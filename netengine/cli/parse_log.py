"""parse_log: a Caffe or netengine training log → CSV tables of train and test outputs.

    tools/parse_log LOGFILE OUTPUT_DIR [--delimiter ,] [--verbose]

Writes ``OUTPUT_DIR/<log name>.train`` and ``OUTPUT_DIR/<log name>.test``: columns NumIters,
Seconds, LearningRate, then one column per net output (as Caffe's tools/extra/parse_log.py).
A table with no rows is written as its header line. Errors print one line and exit 1.
"""
from __future__ import annotations

import argparse
import sys

from netengine.cli import one_line_errors, parse_caffe_args
from netengine.errors import NetEngineError
from netengine.formats import caffe_log


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="parse_log", description="Parse a training log into <log>.train and <log>.test "
                                      "CSV files (NumIters, Seconds, LearningRate, outputs).")
    parser.add_argument("logfile", help="a Caffe or netengine training log (glog lines)")
    parser.add_argument("output_dir", help="folder for the .train and .test files")
    parser.add_argument("--delimiter", default=",", help="column separator (default ',')")
    parser.add_argument("--verbose", action="store_true", help="say what was written")
    return parse_caffe_args(parser, argv)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    if len(args.delimiter) != 1:
        print(f"parse_log: error: --delimiter must be one character, got {args.delimiter!r}",
              file=sys.stderr)
        return 1
    try:
        train, test, tables = caffe_log.write_tables(args.logfile, args.output_dir,
                                                    args.delimiter)
    except (NetEngineError, OSError) as err:
        print(f"parse_log: error: {err}", file=sys.stderr)
        return 1
    if args.verbose:
        for path, rows in ((train, tables.train), (test, tables.test)):
            columns = caffe_log.LogTables.columns(rows)
            print(f"Wrote {path}: {len(rows)} rows, columns {', '.join(columns)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
