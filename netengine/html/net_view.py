"""The net viewer: one self-contained HTML page that draws a constructed net as Caffe users know
it (Netscope, draw_net): layers as boxes coloured by family, blobs as edges, in-place layers
marked, the automatically inserted Split layers hidden.

Each layer box carries ``data-layer="<name>"`` and shows its type and top shape(s)
(``64×20×24×24``); hovering or clicking it shows its set ``*_param`` fields, learnable parameter
count and forward multiply-adds, which come from :mod:`netengine.summary`. The layout is
Graphviz's ``dot`` (to SVG) where it is installed, else a layered list (one row per depth).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from google.protobuf import text_format

from netengine import summary
from netengine.errors import NetEngineError
from netengine.html.svg import FAMILY_COLOURS, esc, page
from netengine.proto import caffe_pb2

_FAMILIES = {
    "data": ("Data", "Input", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData",
             "Python"),
    "conv": ("Convolution", "Deconvolution", "Im2col"),
    "pool": ("Pooling", "SPP"),
    "act": ("ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL",
            "Threshold", "Clip", "Swish", "Dropout"),
    "norm": ("BatchNorm", "LRN", "MVN", "Scale", "Bias", "BatchReindex"),
    "fc": ("InnerProduct", "Embed", "Softmax"),
    "loss": ("Accuracy", "ArgMax", "HDF5Output", "Silence"),
    "struct": ("Concat", "Eltwise", "Slice", "Split", "Flatten", "Reshape", "Crop", "Tile",
               "Reduction", "Filter", "Parameter"),
    "rnn": ("RNN", "LSTM", "Recurrent"),
}
_FAMILY_OF = {t: fam for fam, types in _FAMILIES.items() for t in types}
_AUTO_SPLIT = re.compile(r".+_\d+_split$")


def family(layer_type: str) -> str:
    """The colour family of a layer type (losses by their name's ending)."""
    if layer_type.endswith("Loss"):
        return "loss"
    return _FAMILY_OF.get(layer_type, "other")


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "scalar"


@dataclass
class Box:
    """One drawn layer: what its box shows and what its details panel says."""

    index: int
    name: str
    type: str
    tops: list[tuple[str, str]]
    bottoms: list[str]
    params: int
    shared: int
    macs: int
    inplace: bool
    fields: str
    sources: list[tuple[int, str]] = field(default_factory=list)  # (box index, blob name)

    @property
    def family(self) -> str:
        return family(self.type)


@dataclass
class NetView:
    name: str
    file: str
    phase: str
    boxes: list[Box]
    inputs: dict[str, tuple[int, ...]]
    total_params: int
    total_macs: int
    blob_bytes: int


def _set_params(layer_param) -> str:
    """The ``*_param`` messages set on a layer (and its ``param`` specs), as prototxt text."""
    parts = []
    for descriptor, value in layer_param.ListFields():
        if descriptor.name.endswith("_param") or descriptor.name == "param":
            values = value if descriptor.is_repeated else [value]
            for item in values:
                body = text_format.MessageToString(item, as_utf8=True).rstrip()
                inner = "\n".join("  " + line for line in body.splitlines())
                parts.append(f"{descriptor.name} {{\n{inner}\n}}" if body else
                             f"{descriptor.name} {{ }}")
    return "\n".join(parts)


def describe(net) -> NetView:
    """The view of a constructed Net: boxes with edges resolved through the hidden splits."""
    tally = summary.summarize(net)
    rows = iter(tally.rows)  # one per layer but the automatic splits, in order
    alias: dict[str, str] = {}  # a split's top → the blob it copies
    latest: dict[str, int] = {}  # blob → index of the box that last wrote it
    boxes: list[Box] = []
    for i, layer in enumerate(net.layers):
        bottoms = [alias.get(b, b) for b in net.bottom_ids[i]]
        if layer.type == "Split" and _AUTO_SPLIT.match(layer.name):
            alias.update({top: bottoms[0] for top in net.top_ids[i]})
            continue
        row = next(rows)
        box = Box(len(boxes), layer.name, layer.type,
                  [(name, shape_text(shape)) for name, shape in row.tops], bottoms,
                  row.params, row.shared_params, row.macs,
                  bool(set(net.top_ids[i]) & set(net.bottom_ids[i])),
                  _set_params(layer.layer_param))
        box.sources = [(latest[b], b) for b in bottoms if b in latest]
        boxes.append(box)
        latest.update({top: box.index for top in net.top_ids[i]})
    splits = set(alias)
    blob_bytes = sum(blob.count * net.dtype.itemsize for name, blob in net.blobs.items()
                     if name not in splits)
    return NetView(net.name or "net", net.source_file or "", caffe_pb2.Phase.Name(net.phase),
                   boxes, {n: tuple(net.blobs[n].shape) for n in net.inputs},
                   tally.total_params, tally.total_macs, blob_bytes)


# -- layout 1: Graphviz dot → SVG -------------------------------------------------------------
def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(view: NetView) -> str:
    """The graph in DOT: a node per box (id ``L<index>``), an edge per blob use."""
    lines = ["digraph net {", "  rankdir=TB; nodesep=0.25; ranksep=0.35; bgcolor=transparent;",
             '  node [shape=box, style="rounded,filled", fillcolor="#eeeeee", fontsize=10, '
             'fontname="Helvetica", margin="0.12,0.05"];',
             '  edge [fontsize=9, fontname="Helvetica", arrowsize=0.6];']
    for box in view.boxes:
        label = [box.name, box.type] + [
            shape if top == box.name or len(box.tops) == 1 else f"{top}: {shape}"
            for top, shape in box.tops]
        style = ', style="rounded,filled,dashed"' if box.inplace else ""
        lines.append(f"  L{box.index} [id=\"L{box.index}\", "
                     f"label={_dot_quote(chr(10).join(label))}{style}];")
        for source, blob in box.sources:
            producer = view.boxes[source]
            shown = "" if blob == producer.name or producer.inplace else \
                f" [label={_dot_quote(blob)}]"
            lines.append(f"  L{source} -> L{box.index}{shown};")
    lines.append("}")
    return "\n".join(lines)


_NODE = re.compile(r'<g id="L(\d+)" class="node">')
_PROLOG = re.compile(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<!--.*?-->", re.S)


def dot_svg(view: NetView, dot: str) -> str:
    """Lay the graph out with ``dot -Tsvg``; the node groups get the data-layer attributes."""
    try:
        done = subprocess.run([dot, "-Tsvg"], input=to_dot(view).encode("utf-8"),
                              capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetEngineError(f"Graphviz 'dot' failed: {err}") from None
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
        raise NetEngineError(f"Graphviz 'dot' failed (exit {done.returncode}): {tail[0]}")
    svg = _PROLOG.sub("", done.stdout.decode("utf-8"))

    def tag(match: re.Match) -> str:
        box = view.boxes[int(match.group(1))]
        marks = " inplace" if box.inplace else ""
        return (f'<g id="L{box.index}" class="node layer fam-{box.family}{marks}" '
                f'data-layer="{esc(box.name)}" data-index="{box.index}" tabindex="0">')

    return f'<div class="graph">{_NODE.sub(tag, svg).strip()}</div>'


# -- layout 2: a layered list ------------------------------------------------------------------
def depths(view: NetView) -> list[int]:
    """Each box's depth: one more than the deepest box it reads from (inputs are depth 0)."""
    depth: list[int] = []
    for box in view.boxes:
        depth.append(1 + max((depth[s] for s, _ in box.sources), default=-1))
    return depth


def _list_box(view: NetView, box: Box) -> str:
    """One box of the layered list: name, type, top shapes and where its bottoms come from."""
    sources = ", ".join(view.boxes[s].name + (f" ({b})" if b != view.boxes[s].name else "")
                        for s, b in box.sources) or ", ".join(box.bottoms)
    tops = "".join(f'<div class="shape">{esc(t + ": ") if len(box.tops) > 1 else ""}'
                   f"{esc(s)}</div>" for t, s in box.tops)
    marks = " inplace" if box.inplace else ""
    return (f'<div class="layer box fam-{box.family}{marks}" data-layer="{esc(box.name)}" '
            f'data-index="{box.index}" tabindex="0"><div class="name">{esc(box.name)}</div>'
            f'<div class="type">{esc(box.type)}{" (in-place)" if box.inplace else ""}</div>'
            f"{tops}" + (f'<div class="from">← {esc(sources)}</div>' if sources else "") +
            "</div>")


def layered_list(view: NetView) -> str:
    """The fallback layout: one row per depth, boxes wrapping on narrow screens."""
    levels: dict[int, list[Box]] = {}
    for box, level in zip(view.boxes, depths(view)):
        levels.setdefault(level, []).append(box)
    rows = [f'<li class="level" data-depth="{level}">'
            f'{"".join(_list_box(view, box) for box in levels[level])}</li>'
            for level in sorted(levels)]
    return f'<ol class="levels">{"".join(rows)}</ol>'


# -- the page ----------------------------------------------------------------------------------
VIEW_STYLE = """
.graph { overflow: auto; max-height: 80vh; border: 1px solid var(--border); border-radius: 6px; }
.graph svg { display: block; margin: 0 auto; }
.graph svg text { fill: var(--fg); }
.graph .edge path, .graph .edge polygon { stroke: var(--muted); }
.graph .edge polygon { fill: var(--muted); }
.graph .node.layer { cursor: pointer; }
.graph .node:focus { outline: none; }
.graph .node path, .graph .node polygon { stroke: var(--border); }
.graph .node.selected path, .graph .node.selected polygon { stroke: var(--fg); stroke-width: 2; }
""" + "".join(f".graph .fam-{f} path, .graph .fam-{f} polygon, .box.fam-{f} "
              f"{{ fill: var(--{f}); background: var(--{f}); }}\n"
              for f in FAMILY_COLOURS) + "".join(
    f".chip.fam-{f} {{ background: var(--{f}); }}\n" for f in FAMILY_COLOURS) + """
.layout { display: grid; grid-template-columns: minmax(0, 1fr) minmax(240px, 340px); gap: 1rem; }
@media (max-width: 760px) { .layout { grid-template-columns: minmax(0, 1fr); } }
#details { position: sticky; top: .5rem; align-self: start; border: 1px solid var(--border);
  border-radius: 6px; padding: .6rem; background: var(--panel); min-width: 0; }
ol.levels { list-style: none; margin: 0; padding: 0; }
li.level { display: flex; flex-wrap: wrap; gap: .5rem; padding: .35rem 0;
  border-bottom: 1px dashed var(--border); }
.box { border: 1px solid var(--border); border-radius: 6px; padding: .3rem .5rem;
  min-width: 9rem; cursor: pointer; color: var(--fg); }
.box.inplace { border-style: dashed; }
.box.selected { outline: 2px solid var(--fg); }
.box .name { font-weight: 600; word-break: break-all; }
.box .type, .box .from { font-size: 12px; color: var(--muted); }
.box .shape { font: 12px ui-monospace, Menlo, Consolas, monospace; }
.legend-families { display: flex; flex-wrap: wrap; gap: .3rem .8rem; font-size: 12px;
  margin-bottom: .6rem; }
.legend-families .chip { padding: 0 .4rem; border-radius: 4px; border: 1px solid var(--border); }
"""

VIEW_SCRIPT = """
(function () {
  var layers = JSON.parse(document.getElementById("layer-data").textContent);
  var panel = document.getElementById("details");
  var selected = null;
  function text(tag, value, cls) {
    var el = document.createElement(tag);
    el.textContent = value;
    if (cls) { el.className = cls; }
    return el;
  }
  function show(el) {
    var info = layers[Number(el.getAttribute("data-index"))];
    panel.replaceChildren();
    panel.appendChild(text("h2", info.name));
    panel.appendChild(text("div", info.type + (info.inplace ? " (in-place)" : ""), "muted"));
    var table = document.createElement("table");
    info.rows.forEach(function (row) {
      var tr = document.createElement("tr");
      tr.appendChild(text("th", row[0]));
      tr.appendChild(text("td", row[1]));
      table.appendChild(tr);
    });
    panel.appendChild(table);
    panel.appendChild(text("pre", info.fields || "(no *_param fields set)", "fields"));
  }
  function pick(el) {
    if (selected) { selected.classList.remove("selected"); }
    selected = el;
    el.classList.add("selected");
    show(el);
  }
  document.querySelectorAll("[data-layer]").forEach(function (el) {
    el.addEventListener("click", function () { pick(el); });
    el.addEventListener("mouseenter", function () { show(el); });
    el.addEventListener("mouseleave", function () { if (selected) { show(selected); } });
    el.addEventListener("keydown", function (e) { if (e.key === "Enter") { pick(el); } });
  });
})();
"""


def _num(n: int) -> str:
    return f"{n:,} ({summary.human(n)})" if n >= 1000 else f"{n:,}"


def _info(box: Box) -> dict:
    rows = [["bottoms", ", ".join(box.bottoms) or "none"],
            ["tops", "; ".join(f"{t} {s}" for t, s in box.tops) or "none"],
            ["parameters", _num(box.params) + (" (shared)" if box.shared else "")],
            ["multiply-adds", _num(box.macs)]]
    return {"name": box.name, "type": box.type, "inplace": box.inplace, "rows": rows,
            "fields": box.fields}


def render(view: NetView, layout: str) -> str:
    """The whole page around a layout (the dot SVG or the layered list)."""
    inputs = ", ".join(f"{n} {shape_text(s)}" for n, s in view.inputs.items())
    totals = [("layers", f"{len(view.boxes)}"), ("parameters", _num(view.total_params)),
              ("multiply-adds", _num(view.total_macs) + " per forward pass"),
              ("blob memory", f"{summary.human(view.blob_bytes)}B (data of every blob at this "
                              "batch; training doubles it with the diffs)")]
    legend = "".join(f'<span class="chip fam-{f}">{f}</span>' for f in FAMILY_COLOURS)
    data = json.dumps([_info(b) for b in view.boxes], ensure_ascii=True).replace("</", "<\\/")
    body = (f"<header><h1>{esc(view.name)}</h1><div class=\"muted\">{esc(view.file)} · phase "
            f"{esc(view.phase)}" + (f" · inputs {esc(inputs)}" if inputs else "") + "</div>"
            '<ul class="totals">' + "".join(f"<li>{esc(k)}: <b>{esc(v)}</b></li>"
                                            for k, v in totals) + "</ul></header>"
            f'<div class="legend-families">{legend}<span class="chip" style="border-style: dashed">'
            'in-place</span></div>'
            f'<div class="layout"><main>{layout}</main><aside id="details">'
            '<p class="muted">Hover or click a layer to see its parameters.</p></aside></div>'
            f'<script type="application/json" id="layer-data">{data}</script>')
    return page(f"{view.name}: net view", body, script=VIEW_SCRIPT, style=VIEW_STYLE)


def build_page(net, use_dot: bool = True) -> str:
    """The viewer page of a constructed Net (dot layout where available and asked for)."""
    view = describe(net)
    dot = shutil.which("dot") if use_dot else None
    return render(view, dot_svg(view, dot) if dot else layered_list(view))
