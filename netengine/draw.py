"""Draw a net as a Graphviz graph (Caffe's draw_net), written as DOT text by hand.

Layers are ``record`` nodes coloured by type (Convolution/Deconvolution #FF5050, Pooling
#FF9900, InnerProduct #CC33FF, everything else #6495ED); in-place neuron layers (one bottom,
one top, the same blob) are light green (#90EE90); blobs are grey octagons. Edges run
bottom blob → layer → top blob; a layer's out-edges carry its batch size (data layers) or
``num_output`` (Convolution, Deconvolution, InnerProduct). Rendering to PNG/SVG/PDF needs
Graphviz's ``dot`` program; without it :func:`draw_net_to_file` writes the DOT text instead.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from netengine.errors import NetEngineError
from netengine.formats import upgrade
from netengine.formats.prototxt import read_text_proto, write_atomic
from netengine.net import layer_included
from netengine.proto import caffe_pb2

LAYER_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                "InnerProduct": "#CC33FF"}
DEFAULT_LAYER_COLOR = "#6495ED"
NEURON_LAYER_COLOR = "#90EE90"
BLOB_COLOR = "#E0E0E0"
RANKDIRS = ("LR", "TB", "BT", "RL")
DOT_FORMATS = (".dot", ".gv")
# Layer types whose learned blobs default to (weights, bias) when no param { } blocks are given.
_WEIGHT_BIAS_TYPES = {"Convolution": "convolution_param", "Deconvolution": "convolution_param",
                      "InnerProduct": "inner_product_param", "Embed": "embed_param"}
_BATCH_FIELDS = {"Data": "data_param", "ImageData": "image_data_param",
                 "WindowData": "window_data_param", "HDF5Data": "hdf5_data_param",
                 "MemoryData": "memory_data_param"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _record_text(text: str) -> str:
    """Escape the characters that separate fields in a Graphviz record label."""
    for char in "\\{}|<>\"":
        text = text.replace(char, "\\" + char)
    return text


def _first(values, default: int) -> int:
    return values[0] if len(values) else default


def _size(param, name: str, default: int) -> str:
    """``kernel size: 5`` style value, honouring the 2-d ``*_h``/``*_w`` alternatives."""
    h, w = f"{name}_h", f"{name}_w"
    if param.HasField(h) or param.HasField(w):
        return f"{getattr(param, h)}x{getattr(param, w)}"
    name = "kernel_size" if name == "kernel" else name
    repeated = getattr(param, name)
    if not hasattr(repeated, "__len__"):  # pooling's kernel_size/stride/pad are scalars
        return str(repeated if param.HasField(name) else default)
    return str(_first(repeated, default))


def lr_mults(layer) -> list[float]:
    """The lr_mult of each learned blob as the layer declares it (Caffe's default is 1)."""
    mults = [spec.lr_mult for spec in layer.param]
    field = _WEIGHT_BIAS_TYPES.get(layer.type)
    if not mults and field:
        mults = [1.0, 1.0] if getattr(layer, field).bias_term else [1.0]
    return mults


def layer_label(layer, rankdir: str = "LR", display_lrm: bool = False) -> str:
    """The text of a layer's node: name, (type) and the geometry of conv/pool layers."""
    sep = " " if rankdir in ("TB", "BT") else "\n"
    parts = [layer.name]
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        parts += [f"({layer.type})", f"kernel size: {_size(p, 'kernel', 1)}",
                  f"stride: {_size(p, 'stride', 1)}", f"pad: {_size(p, 'pad', 0)}"]
        if p.group > 1:
            parts.append(f"group: {p.group}")
    elif layer.type == "Pooling":
        p = layer.pooling_param
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
        kernel = "global" if p.global_pooling else _size(p, "kernel", 0)
        parts += [f"({layer.type} {method})", f"kernel size: {kernel}",
                  f"stride: {_size(p, 'stride', 1)}", f"pad: {_size(p, 'pad', 0)}"]
    else:
        parts.append(f"({layer.type})")
    if display_lrm:
        mults = lr_mults(layer)
        if mults:
            parts.append("lr mult: " + ", ".join(f"{m:g}" for m in mults))
    return sep.join(parts)


def edge_label(layer) -> str | None:
    """Batch size for data layers, num_output for Convolution/Deconvolution/InnerProduct."""
    if layer.type in _BATCH_FIELDS:
        return f"Batch {getattr(layer, _BATCH_FIELDS[layer.type]).batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return None


def select_layers(net_param, phase: int | None) -> list:
    """The net's layers kept in ``phase`` (Caffe's include/exclude rules); all when None."""
    if phase is None:
        return list(net_param.layer)
    state = caffe_pb2.NetState(phase=phase)
    return [lp for lp in net_param.layer if layer_included(lp, state)]


def net_to_dot(net_param, rankdir: str = "LR", phase: int | None = None,
               display_lrm: bool = False) -> str:
    """The DOT text of ``net_param`` (a current-format NetParameter)."""
    if rankdir not in RANKDIRS:
        raise NetEngineError(f"rankdir must be one of {', '.join(RANKDIRS)}, got '{rankdir}'")
    nodes: dict[str, str] = {}
    edges: list[str] = []

    def blob(name: str) -> str:
        node = _quote(name + "_blob")
        nodes.setdefault(node, f'{node} [label={_quote(name)}, shape=octagon, '
                               f'style=filled, fillcolor="{BLOB_COLOR}"];')
        return node

    for layer in select_layers(net_param, phase):
        node = _quote(f"{layer.name}_{layer.type}")
        in_place = (len(layer.bottom) == 1 and len(layer.top) == 1
                    and layer.bottom[0] == layer.top[0])
        color = NEURON_LAYER_COLOR if in_place else LAYER_COLORS.get(layer.type,
                                                                     DEFAULT_LAYER_COLOR)
        label = _record_text(layer_label(layer, rankdir, display_lrm)).replace("\n", "\\n")
        nodes.setdefault(node, f'{node} [label="{label}", shape=record, style=filled, '
                               f'fillcolor="{color}"];')
        for bottom in layer.bottom:
            edges.append(f"{blob(bottom)} -> {node};")
        out_label = edge_label(layer)
        attrs = f" [label={_quote(out_label)}]" if out_label else ""
        for top in layer.top:
            edges.append(f"{node} -> {blob(top)}{attrs};")
    lines = [f"digraph {_quote(net_param.name or 'Net')} {{", f"  rankdir={rankdir};",
             '  node [fontname="Helvetica"];', '  edge [fontname="Helvetica"];']
    lines += ["  " + n for n in nodes.values()] + ["  " + e for e in edges] + ["}"]
    return "\n".join(lines) + "\n"


def read_net(path) -> caffe_pb2.NetParameter:
    """A prototxt as a current-format NetParameter (legacy formats upgraded)."""
    param, source = read_text_proto(path, caffe_pb2.NetParameter())
    lines = source.lines("layers") if len(param.layers) else source.lines("layer")
    try:
        param, _ = upgrade.upgrade_net(param, lines, str(path))
    except NetEngineError as err:
        raise err.with_context(file=str(path)) from None
    return param


def render(dot_text: str, path, dot_program: str | None = None) -> Path:
    """Write ``dot_text`` to ``path``, rendered by ``dot`` when the suffix asks for an image.

    Returns the path written: ``path`` itself, or ``path`` with suffix ``.dot`` when ``path``
    wants an image and ``dot`` is not installed.
    """
    path = Path(path)
    fmt = path.suffix.lower()
    if fmt in DOT_FORMATS or not fmt:
        write_atomic(path, dot_text)
        return path
    if (dot_program or shutil.which("dot")) is None:
        fallback = path.with_suffix(".dot")
        write_atomic(fallback, dot_text)
        return fallback
    write_atomic(path, _run_dot(dot_text, fmt[1:], dot_program))
    return path


def _run_dot(dot_text: str, fmt: str, dot_program: str | None = None) -> bytes:
    """``dot_text`` rendered by Graphviz's dot as ``fmt`` (png, svg, pdf, ...)."""
    dot = dot_program or shutil.which("dot")
    if dot is None:
        raise NetEngineError(f"drawing as {fmt} needs Graphviz's dot program "
                             "(apt-get install graphviz); .dot text needs nothing")
    try:
        done = subprocess.run([dot, f"-T{fmt}"], input=dot_text.encode(),
                              capture_output=True, check=False)
    except OSError as err:
        raise NetEngineError(f"cannot run Graphviz dot ({dot}): {err}") from None
    if done.returncode != 0:
        reason = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])
        raise NetEngineError(f"Graphviz dot failed to write {fmt}: {reason[-1]}")
    return done.stdout


def draw_net(net_param, rankdir: str = "LR", ext: str = "png", phase: int | None = None,
             display_lrm: bool = False) -> bytes:
    """pycaffe's ``caffe.draw.draw_net``: the drawing as bytes of format ``ext`` ("dot" or
    "gv" for the DOT text itself)."""
    dot_text = net_to_dot(net_param, rankdir, phase, display_lrm)
    if f".{ext.lower().lstrip('.')}" in DOT_FORMATS:
        return dot_text.encode()
    return _run_dot(dot_text, ext.lower().lstrip("."))


def draw_net_to_file(net_param, path, rankdir: str = "LR", phase: int | None = None,
                     display_lrm: bool = False) -> Path:
    """Draw ``net_param`` to ``path`` (.dot/.gv text, or any image format ``dot`` knows)."""
    return render(net_to_dot(net_param, rankdir, phase, display_lrm), path)
