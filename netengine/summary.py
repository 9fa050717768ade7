"""What a prototxt computes: per-layer top shapes, parameter counts and multiply-adds.

``build(path, phase, input_shapes)`` is the one verdict shared by ``tools/summarize`` and the
acceptance tests: it returns the constructed Net, or raises the one-line NetEngineError that
says why the net is refused (a fork-only layer type or field, a missing data source, ...).
``summarize(net)`` tabulates it; ``format_table`` prints that table.

Multiply-adds (MACs) are counted for the layers that dominate a CNN's cost, exactly:

==============  ===========================================================================
Convolution     top count × (C_in / group) × kernel area  (= top count × weight count / C_out)
Deconvolution   bottom count × (C_out / group) × kernel area  (= bottom count × weight count
                / C_in)
InnerProduct    top count × K (K inputs per output)
RNN, LSTM       T·N × (weight count of every 2-D learned blob but the static input's) +
                N × (the static input's weight count): each step's matrix products
==============  ===========================================================================

Every other layer counts 0 (element-wise, pooling and normalisation work is not a
multiply-add of a weight; it is usually below 1 % of the total). Numbers are for the whole
batch as shaped. Parameters are the counts of each layer's blobs (BatchNorm's statistics
included); a blob shared by name is counted once, at its owner, in the totals.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from netengine import fillers
from netengine.errors import NetEngineError
from netengine.net import Net
from netengine.proto import caffe_pb2

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST}
_AUTO_SPLIT = re.compile(r".+_\d+_split$")


@dataclass
class LayerRow:
    name: str
    type: str
    tops: list[tuple[str, tuple[int, ...]]]
    params: int
    macs: int
    shared_params: int = 0  # of ``params``, those owned by another layer


@dataclass
class Summary:
    name: str
    file: str | None
    phase: int
    rows: list[LayerRow] = field(default_factory=list)
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(row.params - row.shared_params for row in self.rows)

    @property
    def total_macs(self) -> int:
        return sum(row.macs for row in self.rows)


def parse_shape_spec(text: str) -> tuple[str, tuple[int, ...]]:
    """``"data=1,3,227,227"`` → ("data", (1, 3, 227, 227)); NetEngineError when malformed."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        shape = ()
    if not sep or not name.strip() or not shape or any(d < 0 for d in shape):
        raise NetEngineError(f"bad input shape '{text}': expected NAME=D1,D2,... such as "
                             "data=1,3,227,227")
    return name.strip(), shape


def build(path, phase: int = caffe_pb2.TEST, input_shapes: dict | None = None,
          level: int = 0, stages=()):
    """Construct the net for its shapes (weights left at zero, not filled): the Net, or a
    NetEngineError."""
    with fillers.skipped():
        return Net(path, phase, level=level, stages=tuple(stages), input_shapes=input_shapes)


def layer_macs(layer, bottom, top) -> int:
    """Multiply-adds of one forward pass of ``layer`` over its current shapes (see module doc)."""
    if not layer.blobs:
        return 0
    weight = layer.blobs[0]
    if layer.type == "Convolution":
        outputs = layer.layer_param.convolution_param.num_output or weight.shape[0]
        return top[0].count * weight.count // outputs * len(top)
    if layer.type == "Deconvolution":
        return sum(b.count for b in bottom) * (weight.count // weight.shape[0])
    if layer.type == "InnerProduct":
        outputs = layer.layer_param.inner_product_param.num_output or 1
        return top[0].count * (weight.count // outputs)
    if layer.type in ("RNN", "LSTM"):
        steps = bottom[0].count_range(0, 2)  # T·N
        static = 2 if layer.static else None  # blob 2: the static input's weights
        return sum((bottom[0].shape[1] if k == static else steps) * blob.count
                   for k, blob in enumerate(layer.blobs) if blob.num_axes == 2)
    return 0


def summarize(net, show_splits: bool = False) -> Summary:
    """The per-layer table of a constructed net."""
    owned: dict[tuple[int, int], bool] = {}
    indices = getattr(net, "_param_layer_indices", [])
    for net_id, key in enumerate(indices):
        owned[tuple(key)] = net.param_owners[net_id] == -1
    summary = Summary(name=net.name, file=net.source_file, phase=net.phase,
                      outputs=list(net.outputs))
    for name in net.inputs:
        summary.inputs[name] = tuple(net.blobs[name].shape)
    for i, layer in enumerate(net.layers):
        if (layer.type == "Split" and not show_splits and _AUTO_SPLIT.match(layer.name)):
            continue
        tops = [(blob_name, tuple(blob.shape))
                for blob_name, blob in zip(net.top_ids[i], net.top_vecs[i])]
        params = sum(b.count for b in layer.blobs)
        shared = sum(b.count for j, b in enumerate(layer.blobs) if not owned.get((i, j), True))
        summary.rows.append(LayerRow(layer.name, layer.type, tops, params,
                                     layer_macs(layer, net.bottom_vecs[i], net.top_vecs[i]),
                                     shared))
    return summary


def human(n: float) -> str:
    """1234567 → '1.23M' (K, M, G, T); small numbers as they are."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def format_table(summary: Summary) -> str:
    """The summary as a fixed-width text table with totals."""
    phase = caffe_pb2.Phase.Name(summary.phase)
    header = ["layer", "type", "top shape", "params", "mult-adds"]
    rows = []
    for row in summary.rows:
        tops = row.tops or [("", None)]
        for k, (blob, shape) in enumerate(tops):
            shape_text = "" if shape is None else _shape_text(shape)
            if len(row.tops) > 1 or (row.tops and blob != row.name):
                shape_text = f"{blob}: {shape_text}"
            params = f"{row.params:,}" + (" (shared)" if row.shared_params else "")
            rows.append([row.name if k == 0 else "", row.type if k == 0 else "", shape_text,
                         params if k == 0 and row.params else "",
                         f"{row.macs:,}" if k == 0 and row.macs else ""])
    widths = [max(len(h), *(len(r[c]) for r in rows)) if rows else len(h)
              for c, h in enumerate(header)]
    aligns = ["<", "<", "<", ">", ">"]

    def line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths)).rstrip()

    inputs = ", ".join(f"{n} {_shape_text(s)}" for n, s in summary.inputs.items()) or "none"
    out = [f"net '{summary.name}' ({summary.file or 'NetParameter'}), phase {phase}",
           f"inputs: {inputs}", "", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += [line(["-" * w for w in widths]),
            f"{len(summary.rows)} layers; parameters: {summary.total_params:,} "
            f"({human(summary.total_params)}); multiply-adds: {summary.total_macs:,} "
            f"({human(summary.total_macs)}) per forward pass",
            f"outputs: {', '.join(summary.outputs) or 'none'}"]
    return "\n".join(out)
