"""export_onnx: a deploy net and its caffemodel → an ONNX model (opset 13).

    tools/export_onnx --model deploy.prototxt --weights w.caffemodel -o net.onnx [--verify]
                      [--input-shape data=1,3,224,224 ...]

Exports the layers whose ONNX equivalents are exact (see netengine/formats/onnx.py); any other
layer stops the export with one line naming it. ``--verify`` runs the ONNX model in
onnxruntime and the net in netengine on the same random input and prints the largest
relative difference (exit 1 above 1e-4). ``--input-shape`` replaces the shape of an input
(or the data layer producing that top), e.g. to export a batch-10 deploy net with batch 1; the
ONNX graph has fixed shapes. Needs the optional onnx package (and onnxruntime for
--verify). Errors print one line and exit 1.
"""
from __future__ import annotations

import argparse
import sys

from netengine.cli import one_line_errors, parse_caffe_args
from netengine.errors import NetEngineError

TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="export_onnx", description="Export a Caffe deploy net with its weights to ONNX.")
    parser.add_argument("--model", required=True, help="deploy prototxt (fixed input shapes)")
    parser.add_argument("--weights", help="caffemodel (.caffemodel or .caffemodel.h5); without "
                                          "it the fillers' initial weights are exported")
    parser.add_argument("-o", "--output", required=True, help="ONNX file to write")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="shape for input NAME instead of the prototxt's (repeatable)")
    parser.add_argument("--verify", action="store_true",
                        help="compare onnxruntime with netengine on a random input")
    return parse_caffe_args(parser, argv)


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from netengine.formats import onnx
        from netengine.net import TEST, Net
        from netengine.summary import parse_shape_spec

        shapes = dict(parse_shape_spec(spec) for spec in args.input_shape)
        net = Net(args.model, TEST, weights=args.weights, input_shapes=shapes or None)
        if not args.weights:
            print("export_onnx: no --weights given: the exported weights are the fillers' "
                  "initial values", file=sys.stderr)
        model = onnx.export(net, args.output)
        shapes = ", ".join(f"{name}{tuple(net.blobs[name].shape)}" for name in net.inputs)
        print(f"Wrote {args.output}: {len(model.graph.node)} nodes, opset {onnx.OPSET}, "
              f"inputs {shapes}, outputs {', '.join(onnx.output_names(model))}")
        if args.verify:
            worst = onnx.verify(net, model)
            print(f"onnxruntime vs netengine: largest relative difference {worst:.3g}")
            if not worst <= TOLERANCE:
                print(f"export_onnx: error: outputs differ by {worst:.3g} (more than "
                      f"{TOLERANCE:g})", file=sys.stderr)
                return 1
    except NetEngineError as err:
        print(f"export_onnx: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
