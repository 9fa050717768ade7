"""gen_layer_docs: regenerate docs/layers.md from the layer registry and the schema.

    tools/gen_layer_docs [--check] [--out PATH]

``--check`` writes nothing and exits 1 when the file is out of date (as tests/test_docs.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from netengine import docgen
from netengine.cli import one_line_errors, parse_caffe_args


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gen_layer_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=docgen.DOC_PATH,
                        help=f"file to write (default {docgen.DOC_PATH})")
    parser.add_argument("--check", action="store_true",
                        help="only report whether the file is up to date (exit 1 if not)")
    args = parse_caffe_args(parser, argv)
    text = docgen.generate()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else None
        if current != text:
            print(f"gen_layer_docs: {args.out} is out of date; run {docgen.REGENERATE}",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    from netengine.formats.prototxt import write_atomic

    write_atomic(args.out, text)
    print(f"Wrote {args.out} ({len(docgen.shipped_types())} layer types)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
