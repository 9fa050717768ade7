"""netengine: one command for every tool, as Caffe's ``caffe <command>``.

    netengine <command> [flags]      e.g. netengine train -solver nets/mnist_solver.prototxt

``netengine --help`` lists the commands; ``netengine <command> --help`` gives a command's
flags. A ``caffe train|test|time|device_query`` line works with only the program name changed:
every command takes Caffe's single-dash flags (``-solver x``, ``-solver=x``).
"""
from __future__ import annotations

import difflib
import sys
from types import ModuleType

from netengine import cli
from netengine.cli import (
    convert_mnist,
    device_query,
    draw_net,
    export_onnx,
    gen_layer_docs,
    get_mnist,
    parse_log,
    plot_log,
    summarize,
    test,
    time,
    train,
    upgrade_net,
    upgrade_solver,
    view,
)

COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "train": (train, "train or fine-tune a net from a solver prototxt"),
    "test": (test, "score a trained model: mean of each net output over N batches"),
    "time": (time, "time a net's forward and backward passes layer by layer"),
    "device_query": (device_query, "show the GPU a run would use"),
    "summarize": (summarize, "per-layer table of a net: shapes, parameters, multiply-adds"),
    "view": (view, "a net as a self-contained HTML page: layers, shapes, parameters, cost"),
    "draw_net": (draw_net, "draw a net as a graph (PNG, SVG, PDF or DOT)"),
    "parse_log": (parse_log, "a training log -> CSV tables of train and test outputs"),
    "plot_log": (plot_log, "chart training logs (PNG with matplotlib, or --html: a report)"),
    "upgrade_net": (upgrade_net, "rewrite a V0/V1 net (prototxt or caffemodel) as current"),
    "upgrade_solver": (upgrade_solver, "rewrite a legacy solver prototxt as current"),
    "convert_mnist": (convert_mnist, "MNIST IDX files -> an LMDB or LevelDB of Datum"),
    "get_mnist": (get_mnist, "download the full MNIST (60k + 10k), checksummed"),
    "export_onnx": (export_onnx, "a deploy net and its caffemodel -> an ONNX model"),
    "gen_layer_docs": (gen_layer_docs, "regenerate docs/layers.md (for developers)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: netengine <command> [flags]   (netengine <command> --help for its flags)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "-help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = argv[0].replace("-", "_")
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        print(f"netengine: unknown command '{argv[0]}'{hint} (netengine --help lists them)",
              file=sys.stderr)
        return 2
    cli.PROG_PREFIX = "netengine "
    try:
        return COMMANDS[name][0].main(argv[1:])
    finally:
        cli.PROG_PREFIX = ""


if __name__ == "__main__":
    sys.exit(main())
