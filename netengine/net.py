"""Net: a DAG of layers and blobs built from a NetParameter, with Caffe's semantics.

Construction is a short pipeline of named steps (``Net._build``):
  read → upgrade → filter by NetState → insert splits → instantiate → connect and set up
  → backward needs → share params → outputs.
The Net never branches on a layer's type; what differs lives in the layer classes.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

from netengine import backend
from netengine.blob import Blob, blob_from_proto, blob_to_proto, proto_shape_matches
from netengine.errors import LayerError, NetEngineError
from netengine.formats import snapshot, upgrade
from netengine.formats.prototxt import SourceMap, read_text_proto
from netengine.layers import Layer, create_layer
from netengine.logging_glog import at, fmt
from netengine.proto import caffe_pb2

log = logging.getLogger("netengine")

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


# -- pipeline steps that work on messages -------------------------------------------------------
def state_meets_rule(state, rule) -> bool:
    """Caffe's StateMeetsRule: phase, level range, required stages, forbidden stages."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def layer_included(layer_param, state) -> bool:
    """Caffe's FilterNet rule: include rules must meet one; exclude rules must meet none."""
    if layer_param.include:
        return any(state_meets_rule(state, r) for r in layer_param.include)
    return not any(state_meets_rule(state, r) for r in layer_param.exclude)


def split_layer_name(blob: str, layer: str, top_index: int) -> str:
    return f"{blob}_{layer}_{top_index}_split"


def split_blob_name(blob: str, layer: str, top_index: int, k: int) -> str:
    return f"{blob}_{layer}_{top_index}_split_{k}"


def insert_splits(layers: list, lines: list) -> tuple[list, list]:
    """Insert Split layers where one top feeds several bottoms (Caffe's insert_splits).

    A top whose explicit loss_weight is non-zero counts as one more consumer; the split's first
    top then carries that loss weight. Returns new (layer params, source lines).
    """
    last_top: dict[str, tuple[int, int]] = {}
    source_of: dict[tuple[int, int], tuple[int, int]] = {}
    consumers: dict[tuple[int, int], int] = {}
    loss_weight: dict[tuple[int, int], float] = {}
    for i, param in enumerate(layers):
        for j, name in enumerate(param.bottom):
            if name not in last_top:
                raise LayerError(f"unknown bottom blob '{name}' (bottom {j}): no earlier layer "
                                 f"produces it; known blobs: {', '.join(last_top) or 'none'}",
                                 layer=param.name, layer_type=param.type, line=lines[i])
            source_of[(i, j)] = last_top[name]
            consumers[last_top[name]] = consumers.get(last_top[name], 0) + 1
        for j, name in enumerate(param.top):
            last_top[name] = (i, j)
        for j in range(min(len(param.loss_weight), len(param.top))):
            key = last_top[param.top[j]]
            loss_weight[key] = param.loss_weight[j]
            if param.loss_weight[j]:
                consumers[key] = consumers.get(key, 0) + 1
    out, out_lines = [], []
    next_split: dict[tuple[int, int], int] = {}
    for i, original in enumerate(layers):
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(original)
        out.append(param)
        out_lines.append(lines[i])
        for j, name in enumerate(param.bottom):
            src = source_of[(i, j)]
            if consumers.get(src, 0) > 1:
                k = next_split.get(src, 0)
                next_split[src] = k + 1
                param.bottom[j] = split_blob_name(name, layers[src[0]].name, src[1], k)
        for j, name in enumerate(param.top):
            count = consumers.get((i, j), 0)
            if count <= 1:
                continue
            split = caffe_pb2.LayerParameter(name=split_layer_name(name, param.name, j),
                                             type="Split", bottom=[name])
            split.top.extend(split_blob_name(name, param.name, j, k) for k in range(count))
            weight = loss_weight.get((i, j), 0.0)
            if weight:
                split.loss_weight.extend([weight] + [0.0] * (count - 1))
                del param.loss_weight[:]
                next_split[(i, j)] = next_split.get((i, j), 0) + 1
            out.append(split)
            out_lines.append(lines[i])
    return out, out_lines


def replace_data_layers(layers: list, input_shapes: dict) -> list:
    """Stand-in shapes: each bottomless layer producing a named top becomes an Input layer.

    ``input_shapes`` maps top names to shapes; the replaced layer's other tops (e.g. a data
    layer's label) get shape (N,), N being the first dimension of its first given shape.
    """
    shapes = {name: tuple(int(d) for d in dims) for name, dims in input_shapes.items()}
    out, used = [], set()
    for param in layers:
        given = [t for t in param.top if t in shapes]
        if param.bottom or not given:
            out.append(param)
            continue
        batch = shapes[given[0]][:1] or (1,)
        stand_in = caffe_pb2.LayerParameter(name=param.name, type="Input", top=param.top,
                                            phase=param.phase)
        for top in param.top:
            stand_in.input_param.shape.add().dim.extend(shapes.get(top, batch))
        used.update(given)
        out.append(stand_in)
    unknown = [name for name in shapes if name not in used]
    if unknown:
        tops = [t for p in layers if not p.bottom for t in p.top]
        raise NetEngineError(f"input shapes given for {', '.join(unknown)}, which no data or "
                             f"input layer of this net produces (their tops: "
                             f"{', '.join(tops) or 'none'})")
    return out


# -- the Net ------------------------------------------------------------------------------------
def _abs_mean(values) -> float:
    """Caffe's asum / count for debug_info lines."""
    return float(abs(values).sum()) / max(values.size, 1)


def _batch_slice(value, start: int, batch: int) -> np.ndarray:
    """Items [start, start + batch) of ``value`` on the host, zero-padded to a full batch as
    pycaffe pads the last one."""
    part = np.asarray(value[start:start + batch])
    if len(part) < batch:
        pad = np.zeros((batch - len(part),) + part.shape[1:], part.dtype)
        part = np.concatenate([part, pad])
    return part


def _few(names: list[str], count: int = 5) -> str:
    """The first few names of a list, for a one-line message."""
    more = f", ... ({len(names)} in all)" if len(names) > count else ""
    return ", ".join(f"'{name}'" for name in names[:count]) + more


class Net:
    """A Caffe net: ``Net(prototxt, phase, level=0, stages=None, weights=None)`` (pycaffe's
    order; pycaffe's older ``Net(prototxt, weights, phase)`` and ``Net(prototxt, phase,
    weights)`` work too).

    pycaffe-shaped: ``blobs``, ``params``, ``layers``, ``layer_dict``, ``inputs``, ``outputs``,
    ``top_names``, ``bottom_names``, ``forward``, ``backward``, ``copy_from``, ``save``.
    """

    def __init__(self, network, phase=None, level: int = 0,
                 stages: Iterable[str] | None = None, weights: str | None = None, *,
                 dtype=np.float32, input_shapes: dict | None = None) -> None:
        if isinstance(phase, (str, os.PathLike)):  # pycaffe's old Net(file, weights, phase)
            phase, weights, level = level, phase, 0
        elif isinstance(level, (str, os.PathLike)):  # Net(file, phase, weights)
            level, weights = 0, level
        if not isinstance(network, (str, os.PathLike, caffe_pb2.NetParameter)):
            raise NetEngineError(f"Net needs a prototxt path or a NetParameter, got "
                                 f"{type(network).__name__}")
        if phase is not None and phase not in (TRAIN, TEST):
            raise NetEngineError(f"phase must be caffe.TRAIN ({TRAIN}) or caffe.TEST ({TEST}), "
                                 f"got {phase!r}")
        self.phase = TEST if phase is None else int(phase)
        self.dtype = np.dtype(dtype)
        self.input_shapes = dict(input_shapes or {})  # stand-ins for data layers' tops
        self._callbacks: dict[str, list[Callable[[int], None]]] = {
            "before_forward": [], "after_forward": [], "before_backward": [], "after_backward": []}
        self._build(network, int(level), tuple(stages or ()))
        if weights:
            self.copy_from(weights, strict=True)

    # -- construction ----------------------------------------------------------------------------
    def _build(self, network, level: int, stages: tuple[str, ...]) -> None:
        param, source = self._read(network)
        self.source_file = source.file
        param, lines = self._upgrade(param, source)
        if source.file and not param.layer:
            raise NetEngineError("the net defines no layers (an empty or comment-only file?): "
                                 "expected 'layer { name: ... type: ... }' blocks",
                                 file=source.file)
        self.name = param.name
        self.force_backward = param.force_backward
        self.debug_info = param.debug_info  # per-layer mean |data| / |diff| lines (Caffe's)
        state = caffe_pb2.NetState()
        state.CopyFrom(param.state)
        state.phase = self.phase
        state.level = level
        state.stage.extend(stages)
        self.state = state
        kept, kept_lines = self._filter(param, lines, state)
        try:
            if self.input_shapes:
                kept = replace_data_layers(kept, self.input_shapes)
            kept, kept_lines = insert_splits(kept, kept_lines)
        except NetEngineError as err:
            raise err.with_context(file=self.source_file) from None
        self._layer_lines = kept_lines
        self._instantiate(kept)
        self._connect_and_setup()
        self._backward_needs()
        self._warn_inplace_chains()
        self._share_params()
        self._collect_outputs()
        for name in self.outputs:
            log.info("This network produces output %s", name, extra=at("net.cpp:257"))
        log.info("Network initialization done.", extra=at("net.cpp:270"))

    def _read(self, network) -> tuple[caffe_pb2.NetParameter, SourceMap]:
        if isinstance(network, caffe_pb2.NetParameter):
            param = caffe_pb2.NetParameter()
            param.CopyFrom(network)
            return param, SourceMap(None, [])
        return read_text_proto(network, caffe_pb2.NetParameter())

    def _upgrade(self, param, source: SourceMap) -> tuple[caffe_pb2.NetParameter, list]:
        """Bring legacy nets (V0/V1 layers, net-level inputs) to the current format."""
        lines = source.lines("layers") if len(param.layers) else source.lines("layer")
        try:
            param, lines = upgrade.upgrade_net(param, lines, source.file)
        except NetEngineError as err:
            raise err.with_context(file=source.file) from None
        lines = list(lines) + [None] * (len(param.layer) - len(lines))
        return param, lines

    def _filter(self, param, lines, state) -> tuple[list, list]:
        kept, kept_lines = [], []
        for layer_param, line in zip(param.layer, lines):
            if layer_param.include and layer_param.exclude:
                raise LayerError("specify either include rules or exclude rules, not both",
                                 file=self.source_file, line=line, layer=layer_param.name,
                                 layer_type=layer_param.type)
            if layer_included(layer_param, state):
                copy = caffe_pb2.LayerParameter()
                copy.CopyFrom(layer_param)
                if not copy.HasField("phase"):
                    copy.phase = self.phase
                kept.append(copy)
                kept_lines.append(line)
        return kept, kept_lines

    def _context(self, index: int) -> dict:
        param = self.layers[index].layer_param if index < len(self.layers) else None
        return {"file": self.source_file, "line": self._layer_lines[index],
                "layer": param.name if param else None, "layer_type": param.type if param else None}

    def _instantiate(self, layer_params: list) -> None:
        self.layers: list[Layer] = []
        for i, param in enumerate(layer_params):
            try:
                self.layers.append(create_layer(param))
                self.layers[-1].source_file = self.source_file  # e.g. Python layers' modules
                if self.source_file:
                    # Relative paths in a prototxt (data sources, Python modules) may also
                    # resolve against the prototxt's own folder.
                    folder = os.path.dirname(os.path.abspath(self.source_file))
                    self.layers[-1].search_dirs = (folder,)
            except NetEngineError as err:
                raise err.inside(file=self.source_file, line=self._layer_lines[i],
                                 layer=param.name, layer_type=param.type) from None
        self._layer_names = [layer.name for layer in self.layers]

    def _connect_and_setup(self) -> None:
        self._blobs: OrderedDict[str, Blob] = OrderedDict()
        self._blob_need_backward: dict[str, bool] = {}
        self.bottom_vecs: list[list[Blob]] = []
        self.top_vecs: list[list[Blob]] = []
        self.bottom_ids: list[list[str]] = []
        self.top_ids: list[list[str]] = []
        self.bottom_need_backward: list[list[bool]] = []
        self.layer_need_backward: list[bool] = []
        self._loss_weights: dict[str, float] = {}
        self.inputs: list[str] = []
        available: set[str] = set()
        self._available = available  # also for a net whose every layer was filtered out
        for i, layer in enumerate(self.layers):
            try:
                self._setup_layer(i, layer, available)
            except NetEngineError as err:
                raise err.inside(**self._context(i)) from None
            except (ValueError, TypeError, IndexError, ArithmeticError, MemoryError) as err:
                raise LayerError(f"setup failed: {type(err).__name__}: {err}",
                                 **self._context(i)) from err

    def _setup_layer(self, i: int, layer: Layer, available: set[str]) -> None:
        param = layer.layer_param
        if param.propagate_down and len(param.propagate_down) != len(param.bottom):
            raise layer.fail(f"propagate_down must be given once per bottom ({len(param.bottom)})"
                             f" or not at all, got {len(param.propagate_down)}")
        bottoms, needs = [], []
        for j, name in enumerate(param.bottom):
            if name not in self._blobs:
                raise layer.fail(f"unknown bottom blob '{name}'")
            bottoms.append(self._blobs[name])
            need = self._blob_need_backward[name]
            if param.propagate_down:
                need = need and bool(param.propagate_down[j])
            needs.append(need)
            available.discard(name)
        tops, top_names = [], list(param.top)
        if layer.auto_top_blobs:
            wanted = max(layer.exact_tops or 0, layer.min_tops or 0)
            while len(top_names) < wanted:
                top_names.append(f"(automatic) {param.name} top {len(top_names)}")
        for j, name in enumerate(top_names):
            if j < len(param.bottom) and param.bottom[j] == name:
                if not layer.allows_inplace:
                    raise layer.fail("does not allow in-place computation (top == bottom)")
                tops.append(self._blobs[name])
            elif name in top_names[:j]:
                raise layer.fail(f"lists top '{name}' twice")
            elif name in self._blobs:
                raise layer.fail(f"top blob '{name}' is produced by more than one layer")
            else:
                blob = Blob((), dtype=self.dtype)
                self._blobs[name] = blob
                self._blob_need_backward[name] = False
                tops.append(blob)
            if j < len(param.top):  # Caffe's anonymous automatic tops are never outputs
                available.add(name)
        if layer.is_input:
            self.inputs.extend(top_names)
        log.info("Creating Layer %s", param.name, extra=at("net.cpp:84"))
        for bottom_name in param.bottom:
            log.info("%s <- %s", param.name, bottom_name, extra=at("net.cpp:406"))
        for top_name in top_names:
            log.info("%s -> %s", param.name, top_name, extra=at("net.cpp:380"))
        layer.setup(bottoms, tops)
        log.info("Setting up %s", param.name, extra=at("net.cpp:122"))
        for j, blob in enumerate(tops):
            log.info("Top shape: %s", blob.shape_string(), extra=at("net.cpp:129"))
            if layer.loss_weights and j < len(layer.loss_weights) and layer.loss_weights[j]:
                log.info("    with loss weight %s", fmt(layer.loss_weights[j]),
                         extra=at("net.cpp:137"))
        self.bottom_vecs.append(bottoms)
        self.top_vecs.append(tops)
        self.bottom_ids.append(list(param.bottom))
        self.top_ids.append(top_names)
        need_backward = any(needs)
        default_spec = caffe_pb2.ParamSpec()
        for k in range(len(layer.blobs)):
            spec = param.param[k] if k < len(param.param) else default_spec
            learn = spec.lr_mult != 0
            need_backward |= learn
            while len(layer.param_propagate_down) <= k:
                layer.param_propagate_down.append(True)
            layer.param_propagate_down[k] = learn
        for j, name in enumerate(top_names):
            if layer.loss_weights and layer.loss_weights[j]:
                self._loss_weights[name] = layer.loss_weights[j]
            if need_backward:
                self._blob_need_backward[name] = True
        self.bottom_need_backward.append(needs)
        self.layer_need_backward.append(need_backward)
        self._available = available

    def _backward_needs(self) -> None:
        """Prune backward where no loss is reached (Caffe's Net::Init second pass)."""
        under_loss: set[str] = set()
        skip_backprop: set[str] = set()
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            contributes, skip = False, True
            for j, name in enumerate(self.top_ids[i]):
                if (layer.loss_weights and layer.loss_weights[j]) or name in under_loss:
                    contributes = True
                if name not in skip_backprop:
                    skip = False
            if self.layer_need_backward[i] and skip:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_need_backward[i])
            if not contributes:
                self.layer_need_backward[i] = False
            for j, name in enumerate(self.bottom_ids[i]):
                if contributes:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[i][j] = False
                if not self.bottom_need_backward[i][j]:
                    skip_backprop.add(name)
        if self.force_backward:
            for i, layer in enumerate(self.layers):
                self.layer_need_backward[i] = True
                for j, name in enumerate(self.bottom_ids[i]):
                    self.bottom_need_backward[i][j] = (self.bottom_need_backward[i][j]
                                                       or layer.allow_force_backward(j))
                    self._blob_need_backward[name] = (self._blob_need_backward[name]
                                                      or self.bottom_need_backward[i][j])
                layer.param_propagate_down = [True] * len(layer.blobs)

    def _warn_inplace_chains(self) -> None:
        """Warn (once per chain) where an in-place layer rewrites a blob whose earlier in-place
        layer reads it in backward, e.g. ReLU then BatchNorm in place: the ReLU's gradient then
        follows the BatchNorm's output. Caffe computes the same, so only a warning, and only for
        TRAIN nets (a solver's TEST nets would repeat it)."""
        if self.phase != TRAIN:
            return
        readers: dict[str, int] = {}  # blob -> the in-place layer reading it in backward
        for i, layer in enumerate(self.layers):
            bottoms = self.bottom_ids[i]
            for j, name in enumerate(self.top_ids[i]):
                reader = readers.pop(name, None)
                if j >= len(bottoms) or bottoms[j] != name:
                    continue  # not in place: a new blob
                if reader is not None and layer.rewrites_in_place:
                    self._warn_inplace(reader, i, name)
                elif reader is not None:
                    readers[name] = reader  # e.g. Dropout between: the chain goes on
                elif layer.backward_reads_output and self.layer_need_backward[i]:
                    readers[name] = i

    def _warn_inplace(self, reader: int, writer: int, blob: str) -> None:
        first, second = self.layers[reader], self.layers[writer]
        line = self._layer_lines[reader]
        where = f"{self.source_file}:{line}: " if self.source_file and line else ""
        log.warning("%slayer '%s' (%s) runs in place on blob '%s' and reads it in backward, "
                    "but layer '%s' (%s) then overwrites it in place, so %s's gradient follows "
                    "%s's output (Caffe does the same; such nets often train into NaN): give "
                    "'%s' its own top", where, first.name, first.type, blob, second.name,
                    second.type, first.name, second.name, first.name, extra=at("net.cpp:170"))

    def _share_params(self) -> None:
        """Own or share every learned blob by ParamSpec name; record lr/decay multipliers."""
        self.learnable_params: list[Blob] = []
        self.params_lr: list[float] = []
        self.params_weight_decay: list[float] = []
        self.param_owners: list[int] = []
        self.param_display_names: list[str] = []
        self._param_layer_indices: list[tuple[int, int]] = []
        self._param_ids: list[list[int]] = [[] for _ in self.layers]  # [layer][j] → net id
        owner_by_name: dict[str, int] = {}
        has_lr: list[bool] = []
        has_decay: list[bool] = []
        learnable_of: list[int] = []
        default_spec = caffe_pb2.ParamSpec()
        for i, layer in enumerate(self.layers):
            specs = layer.layer_param.param
            for j, blob in enumerate(layer.blobs):
                spec = specs[j] if j < len(specs) else default_spec
                net_id = len(self._param_layer_indices)
                self._param_layer_indices.append((i, j))
                self._param_ids[i].append(net_id)
                self.param_display_names.append(spec.name or str(j))  # Caffe's display name
                if not spec.name or spec.name not in owner_by_name:
                    if spec.name:
                        owner_by_name[spec.name] = net_id
                    self.param_owners.append(-1)
                    learnable_of.append(len(self.learnable_params))
                    self.learnable_params.append(blob)
                    has_lr.append(spec.HasField("lr_mult"))
                    has_decay.append(spec.HasField("decay_mult"))
                    self.params_lr.append(spec.lr_mult)
                    self.params_weight_decay.append(spec.decay_mult)
                    continue
                owner_id = owner_by_name[spec.name]
                self.param_owners.append(owner_id)
                oi, oj = self._param_layer_indices[owner_id]
                owner = self.layers[oi].blobs[oj]
                self._check_share(i, spec, blob, owner, self.layers[oi].name)
                lid = learnable_of[owner_id]
                learnable_of.append(lid)
                for flag, values, field in ((has_lr, self.params_lr, "lr_mult"),
                                            (has_decay, self.params_weight_decay, "decay_mult")):
                    if spec.HasField(field):
                        if flag[lid] and values[lid] != getattr(spec, field):
                            raise LayerError(f"shared param '{spec.name}' has mismatched {field}",
                                             **self._context(i))
                        flag[lid] = True
                        values[lid] = getattr(spec, field)
                blob.share_data(owner)
                blob.share_diff(owner)

    def _check_share(self, i, spec, blob: Blob, owner: Blob, owner_name: str) -> None:
        permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
        ok = blob.count == owner.count if permissive else blob.shape == owner.shape
        if not ok:
            raise LayerError(f"cannot share param '{spec.name}' owned by layer '{owner_name}': "
                             f"{'count' if permissive else 'shape'} mismatch, owner "
                             f"{owner.shape} vs this layer {blob.shape}", **self._context(i))

    def _collect_outputs(self) -> None:
        # Caffe keeps the remaining blobs in a std::set: outputs come sorted by name.
        self.outputs = sorted(self._available)

    # -- pycaffe-shaped views --------------------------------------------------------------------
    @property
    def blobs(self) -> OrderedDict[str, Blob]:
        return self._blobs

    @property
    def params(self) -> OrderedDict[str, list[Blob]]:
        return OrderedDict((layer.name, layer.blobs) for layer in self.layers if layer.blobs)

    @property
    def blob_loss_weights(self) -> OrderedDict[str, float]:
        """Every blob's loss weight, 0 for blobs that are not losses (pycaffe)."""
        return OrderedDict((name, self._loss_weights.get(name, 0.0)) for name in self._blobs)

    # pycaffe's list-shaped twins of the dict views
    _blob_names = property(lambda self: list(self._blobs))
    _blob_loss_weights = property(lambda self: list(self.blob_loss_weights.values()))
    _inputs = property(lambda self: list(self.inputs))
    _outputs = property(lambda self: list(self.outputs))

    @property
    def layer_dict(self) -> OrderedDict[str, Layer]:
        return OrderedDict(zip(self._layer_names, self.layers))

    @property
    def top_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict(zip(self._layer_names, self.top_ids))

    @property
    def bottom_names(self) -> OrderedDict[str, list[str]]:
        return OrderedDict(zip(self._layer_names, self.bottom_ids))

    @property
    def param_layer_indices(self) -> list[tuple[int, int]]:
        """(layer index, blob index) of every param, in net order (Caffe's param ids)."""
        return list(self._param_layer_indices)

    @property
    def blob_need_backward(self) -> dict[str, bool]:
        return dict(self._blob_need_backward)

    def layer_line(self, name: str) -> int | None:
        """The prototxt line of layer ``name``'s block (None where not known)."""
        return self._layer_lines[self._layer_names.index(name)]

    # -- callbacks --------------------------------------------------------------------------------
    def before_forward(self, callback: Callable[[int], None]) -> None:
        self._callbacks["before_forward"].append(callback)

    def after_forward(self, callback: Callable[[int], None]) -> None:
        self._callbacks["after_forward"].append(callback)

    def before_backward(self, callback: Callable[[int], None]) -> None:
        self._callbacks["before_backward"].append(callback)

    def after_backward(self, callback: Callable[[int], None]) -> None:
        self._callbacks["after_backward"].append(callback)

    # -- passes -----------------------------------------------------------------------------------
    def _index(self, name: str | None, default: int) -> int:
        if name is None:
            return default
        try:
            return self._layer_names.index(name)
        except ValueError:
            raise NetEngineError(f"net has no layer named '{name}'") from None

    def forward_from_to(self, start: int, end: int) -> float:
        loss = 0.0
        before, after = self._callbacks["before_forward"], self._callbacks["after_forward"]
        for i in range(start, end + 1):
            for cb in before:
                cb(i)
            try:
                loss += self.layers[i].forward(self.bottom_vecs[i], self.top_vecs[i])
            except NetEngineError as err:
                raise err.inside(**self._context(i)) from None
            if self.debug_info:
                self._forward_debug_info(i)
            for cb in after:
                cb(i)
        return loss

    # -- debug_info: Caffe's mean absolute values per blob, logged as the net runs -------------
    def _forward_debug_info(self, i: int) -> None:
        name = self._layer_names[i]
        for blob_name, blob in zip(self.top_ids[i], self.top_vecs[i]):
            log.info("    [Forward] Layer %s, top blob %s data: %s", name, blob_name,
                     fmt(_abs_mean(blob.data)), extra=at("net.cpp:933"))
        for j, blob in enumerate(self.layers[i].blobs):
            log.info("    [Forward] Layer %s, param blob %s data: %s", name,
                     self.param_display_names[self._param_ids[i][j]], fmt(_abs_mean(blob.data)),
                     extra=at("net.cpp:944"))

    def _backward_debug_info(self, i: int) -> None:
        name, layer = self._layer_names[i], self.layers[i]
        for j, (blob_name, blob) in enumerate(zip(self.bottom_ids[i], self.bottom_vecs[i])):
            if self.bottom_need_backward[i][j]:
                log.info("    [Backward] Layer %s, bottom blob %s diff: %s", name, blob_name,
                         fmt(_abs_mean(blob.diff)), extra=at("net.cpp:961"))
        for j, blob in enumerate(layer.blobs):
            if j < len(layer.param_propagate_down) and layer.param_propagate_down[j]:
                log.info("    [Backward] Layer %s, param blob %d diff: %s", name, j,
                         fmt(_abs_mean(blob.diff)), extra=at("net.cpp:972"))

    def update_debug_info(self) -> None:
        """Caffe's UpdateDebugInfo for every param, before the update is applied."""
        for net_id, (i, j) in enumerate(self._param_layer_indices):
            blob, owner = self.layers[i].blobs[j], self.param_owners[net_id]
            display = self.param_display_names[net_id]
            if owner < 0:
                log.info("    [Update] Layer %s, param %s data: %s; diff: %s",
                         self._layer_names[i], display, fmt(_abs_mean(blob.data)),
                         fmt(_abs_mean(blob.diff)), extra=at("net.cpp:988"))
            else:
                log.info("    [Update] Layer %s, param blob %s (owned by layer %s, param %s) "
                         "diff: %s", self._layer_names[i], display,
                         self._layer_names[self._param_layer_indices[owner][0]],
                         self.param_display_names[owner], fmt(_abs_mean(blob.diff)),
                         extra=at("net.cpp:993"))

    def backward_from_to(self, start: int, end: int) -> None:
        before, after = self._callbacks["before_backward"], self._callbacks["after_backward"]
        for i in range(start, end - 1, -1):
            if not self.layer_need_backward[i]:
                continue
            for cb in before:
                cb(i)
            self.layers[i].backward(self.top_vecs[i], self.bottom_need_backward[i],
                                    self.bottom_vecs[i])
            if self.debug_info:
                self._backward_debug_info(i)
            for cb in after:
                cb(i)

    def forward(self, blobs: Iterable[str] | None = None, start: str | None = None,
                end: str | None = None, **inputs) -> dict:
        """Run forward (from ``start`` to ``end``); returns {output name: data}. Inputs of
        another shape reshape the net; if the net refuses them, it keeps its old shapes."""
        for name in inputs:
            if name not in self.inputs:
                raise NetEngineError(f"'{name}' is not an input of this net "
                                     f"(inputs: {', '.join(self.inputs) or 'none'})")
        first, last = self._index(start, 0), self._index(end, len(self.layers) - 1)
        old_shapes = {}
        for name, value in inputs.items():
            blob = self._blobs[name]
            value = backend.to_module(np.asarray(value) if blob.xp is np else value, blob.xp)
            if value.shape != blob.shape:
                old_shapes[name] = blob.shape
                blob.reshape(value.shape)
            blob.data[...] = value
        try:
            self.last_loss = self.forward_from_to(first, last)
        except NetEngineError:
            if old_shapes:
                for name, shape in old_shapes.items():
                    self._blobs[name].reshape(shape)
                self.reshape()
            raise
        names = list(self.top_ids[last]) if end is not None else list(self.outputs)
        names += [b for b in (blobs or ()) if b not in names]
        return {name: self._blobs[name].data for name in names}

    def backward(self, diffs: Iterable[str] | None = None, start: str | None = None,
                 end: str | None = None, **top_diffs) -> dict:
        """Run backward (from ``start`` down to ``end``); returns {input name: diff}.
        ``top_diffs`` set output blobs' diffs first (batch-sized, broadcast as pycaffe)."""
        for name, value in top_diffs.items():
            if name not in self.outputs:
                raise NetEngineError(f"backward({name}=...): '{name}' is not an output of this "
                                     f"net (outputs: {', '.join(self.outputs) or 'none'})")
            blob = self._blobs[name]
            shape = tuple(np.shape(value))
            if shape[:1] != blob.shape[:1]:  # pycaffe's "Diff is not batch sized"
                raise NetEngineError(f"backward({name}=...): diff of shape {shape} is not batch "
                                     f"sized for blob '{name}' of shape {blob.shape}")
            try:
                blob.diff[...] = backend.to_module(np.asarray(value), blob.xp) \
                    if blob.xp is np else value
            except ValueError:
                raise NetEngineError(f"backward({name}=...): a diff of shape {shape} does not "
                                     f"fit blob '{name}' of shape {blob.shape}") from None
        first = self._index(start, len(self.layers) - 1)
        last = self._index(end, 0)
        self.backward_from_to(first, last)
        names = list(self.bottom_ids[last]) if end is not None else list(self.inputs)
        names += [d for d in (diffs or ()) if d not in names]
        return {name: self._blobs[name].diff for name in names}

    def forward_all(self, blobs: Iterable[str] | None = None, **inputs) -> dict:
        """Forward every item of ``inputs`` in batches of the net's batch size (pycaffe)."""
        if not inputs:
            return {k: v.copy() for k, v in self.forward(blobs).items()}
        total = len(next(iter(inputs.values())))
        batch = self._blobs[next(iter(inputs))].shape[0]
        pieces: dict[str, list] = {}
        for start in range(0, total, batch):
            chunk = {name: _batch_slice(value, start, batch) for name, value in inputs.items()}
            for name, value in self.forward(blobs, **chunk).items():
                pieces.setdefault(name, []).append(backend.to_host(value).copy())
        return {name: np.concatenate(parts)[:total] for name, parts in pieces.items()}

    def set_input_arrays(self, data, labels, layer_index: int = 0) -> None:
        """Feed the first MemoryData layer (pycaffe's ``set_input_arrays``)."""
        for i in range(layer_index, len(self.layers)):
            layer = self.layers[i]
            if callable(getattr(type(layer), "set_input_arrays", None)):  # MemoryData's
                try:
                    layer.set_input_arrays(data, labels)
                except NetEngineError as err:
                    raise err.inside(**self._context(i)) from None
                return
        raise NetEngineError("set_input_arrays needs a MemoryData layer in the net")

    def forward_backward(self) -> float:
        """One forward and backward over the whole net; returns the loss (Solver's step)."""
        loss = self.forward_from_to(0, len(self.layers) - 1)
        self.backward_from_to(len(self.layers) - 1, 0)
        return loss

    def forward_backward_all(self, blobs: Iterable[str] | None = None,
                             diffs: Iterable[str] | None = None, **kwargs) -> tuple[dict, dict]:
        """pycaffe's batched forward then backward: ``kwargs`` hold inputs (forward) and
        output diffs (backward), all with the same number of items; returns (outputs,
        input diffs) as host arrays over every item."""
        fwd_in = {k: v for k, v in kwargs.items() if k in self.inputs}
        bwd_in = {k: v for k, v in kwargs.items() if k not in self.inputs}
        total = len(next(iter(kwargs.values()))) if kwargs else 0
        batch = self._blobs[self.inputs[0]].shape[0] if self.inputs else total
        outs: dict[str, list] = {}
        grads: dict[str, list] = {}
        for start in range(0, max(total, 1), max(batch, 1)):
            chunk = {k: _batch_slice(v, start, batch) for k, v in fwd_in.items()}
            for name, value in self.forward(blobs, **chunk).items():
                outs.setdefault(name, []).append(backend.to_host(value).copy())
            chunk = {k: _batch_slice(v, start, batch) for k, v in bwd_in.items()}
            for name, value in self.backward(diffs, **chunk).items():
                grads.setdefault(name, []).append(backend.to_host(value).copy())
        n = total or None
        return ({k: np.concatenate(v)[:n] for k, v in outs.items()},
                {k: np.concatenate(v)[:n] for k, v in grads.items()})

    def share_with(self, other: Net) -> None:
        """Use ``other``'s learned blobs' storage for the layers of the same name (Caffe's
        ShareTrainedLayersWith: a test net following its train net, no copies)."""
        source = other.layer_dict
        for layer in self.layers:
            owner_layer = source.get(layer.name)
            if owner_layer is None or not layer.blobs:
                continue
            if len(layer.blobs) != len(owner_layer.blobs):
                raise NetEngineError(f"layer '{layer.name}' has {len(layer.blobs)} learned "
                                     f"blobs in this net but {len(owner_layer.blobs)} in the "
                                     "net it shares with")
            for j, (blob, owner) in enumerate(zip(layer.blobs, owner_layer.blobs)):
                if blob.shape != owner.shape:
                    raise NetEngineError(f"cannot share param {j} of layer '{layer.name}': "
                                         f"shape {owner.shape} in the net shared with, "
                                         f"{blob.shape} here")
                blob.share_data(owner)

    def reshape(self) -> None:
        """Propagate input shapes through every layer (after ``blobs[name].reshape``)."""
        for i, layer in enumerate(self.layers):
            try:
                layer.reshape(self.bottom_vecs[i], self.top_vecs[i])
            except NetEngineError as err:
                raise err.inside(**self._context(i)) from None

    def clear_param_diffs(self) -> None:
        for blob in self.learnable_params:
            blob.diff[...] = 0

    def update(self) -> None:
        """data -= diff for every owned learnable blob."""
        for blob in self.learnable_params:
            blob.update()

    # -- weights ----------------------------------------------------------------------------------
    def copy_from(self, source, strict: bool = False) -> list[str]:
        """Copy weights by layer name from a caffemodel (path or NetParameter), binary or HDF5
        (told apart by content, as Caffe's CopyTrainedLayersFrom).

        Accepts V1 files and legacy 4-D blob shapes; returns the names of the source layers
        that were ignored because this net has no layer of that name. A named layer must bring
        exactly the blobs this net's layer has (Caffe's rule). ``strict`` (scoring, resuming,
        ``Net(..., weights=)``) also refuses a file that gives weights to no learned layer;
        otherwise (fine-tuning) that is a warning.
        """
        if isinstance(source, caffe_pb2.NetParameter):
            param, where = source, None
        else:
            where = str(source)
            if not os.path.exists(where):
                raise NetEngineError(f"weights file not found: {where}")
            if snapshot.is_hdf5(where):
                return self.load_hdf5(where, strict)
            param = snapshot.read_weights(where)
        by_name = self.layer_dict
        ignored, copied = [], []
        source_layers = list(param.layer) or list(param.layers)
        for source_layer in source_layers:
            target = by_name.get(source_layer.name)
            if target is None:
                ignored.append(source_layer.name)
                continue
            self._copy_layer_blobs(target, source_layer, where)
            if target.blobs:
                copied.append(target.name)
        self._report_copy(where or "NetParameter", [layer.name for layer in source_layers],
                          ignored, copied, strict)
        return ignored

    def _report_copy(self, where: str, names: list[str], ignored: list[str], copied: list[str],
                     strict: bool) -> None:
        """Log what a weights file gave; refuse (strict) or warn when it gave nothing."""
        self.ignored_layers = ignored
        if ignored:
            log.info("copy_from %s: ignoring source layer(s) this net does not have: %s",
                     where, _few(ignored))
        if copied:
            log.info("copy_from %s: copied the weights of %d layer(s): %s", where, len(copied),
                     _few(copied))
            return
        learned = [layer.name for layer in self.layers if layer.blobs]
        if not learned:
            return
        message = (f"no layer of this net gets weights from this file: it has layers "
                   f"[{_few(names) or 'none'}], the net's learned layers are [{_few(learned)}] "
                   "(the wrong weights file, or renamed layers?)")
        if strict:
            raise NetEngineError(message, file=where if where != "NetParameter" else None)
        # Caffe carries on silently; a run on random weights deserves a warning.
        log.warning("copy_from %s: %s; their weights stay as initialised", where, message)

    def _copy_layer_blobs(self, target: Layer, source_layer, where) -> None:
        if len(target.blobs) != len(source_layer.blobs):
            raise LayerError(f"incompatible number of blobs: the weights file has "
                             f"{len(source_layer.blobs)}, the net expects {len(target.blobs)}",
                             file=where, layer=target.name, layer_type=target.type)
        for j, (blob, proto) in enumerate(zip(target.blobs, source_layer.blobs)):
            try:
                values = blob_from_proto(proto)
            except NetEngineError as err:
                raise LayerError(f"param {j}: {err.message}", file=where, layer=target.name,
                                 layer_type=target.type) from None
            if not proto_shape_matches(blob, proto):
                raise LayerError(f"cannot copy param {j}: shape mismatch, the weights file has "
                                 f"{values.shape}, the net expects {blob.shape}; rename the layer "
                                 "to learn it from scratch", file=where, layer=target.name,
                                 layer_type=target.type)
            blob.data[...] = backend.to_module(values.reshape(blob.shape), blob.xp)

    def to_proto(self, write_diff: bool = False) -> caffe_pb2.NetParameter:
        """The net as a NetParameter holding each layer's parameters and blobs (Caffe's ToProto)."""
        param = caffe_pb2.NetParameter(name=self.name)
        for layer in self.layers:
            lp = param.layer.add()
            lp.CopyFrom(layer.layer_param)
            del lp.blobs[:]
            for blob in layer.blobs:
                lp.blobs.append(blob_to_proto(blob, write_diff))
        return param

    def _owns(self, layer_index: int, param_index: int) -> bool:
        """False for a param shared from another layer (its owner carries the values)."""
        net_id = self._param_layer_indices.index((layer_index, param_index))
        return self.param_owners[net_id] == -1

    def save(self, path: str, write_diff: bool = False) -> None:
        """Write the weights atomically: a binary caffemodel, or Caffe's HDF5 layout when
        ``path`` ends in ``.h5`` (needs h5py; pycaffe's ``save_hdf5``)."""
        if str(path).endswith(".h5"):
            self.save_hdf5(path, write_diff)
        else:
            snapshot.write_weights(path, self.to_proto(write_diff))

    def save_hdf5(self, path: str, write_diff: bool = False) -> None:
        """Caffe's Net::ToHDF5: each layer's own params (not shared ones) under ``data``."""
        data = [(layer.name, {j: blob.data for j, blob in enumerate(layer.blobs)
                              if self._owns(i, j)}) for i, layer in enumerate(self.layers)]
        diff = None
        if write_diff:
            diff = [(layer.name, {j: blob.diff for j, blob in enumerate(layer.blobs)})
                    for layer in self.layers]
        snapshot.write_weights_hdf5(path, data, diff)

    def load_hdf5(self, path: str, strict: bool = False) -> list[str]:
        """Copy weights from a ``.caffemodel.h5`` (Caffe's CopyTrainedLayersFromHDF5); returns
        the names of the file's layers this net does not have."""
        layers = snapshot.read_weights_hdf5(path)
        where = str(path)
        copied = []
        for li, layer in enumerate(self.layers):
            arrays = layers.get(layer.name)
            if arrays is None or not layer.blobs:
                continue
            copied.append(layer.name)
            if len(arrays) > len(layer.blobs):
                raise NetEngineError(f"incompatible number of blobs: the weights file has "
                                     f"{len(arrays)}, the net expects {len(layer.blobs)}",
                                     file=where, layer=layer.name, layer_type=layer.type)
            for j, blob in enumerate(layer.blobs):
                if j not in arrays:
                    if not self._owns(li, j):
                        continue
                    raise NetEngineError(f"param {j} is missing from the weights file",
                                         file=where, layer=layer.name, layer_type=layer.type)
                if arrays[j].shape != blob.shape:
                    raise NetEngineError(f"cannot copy param {j}: shape mismatch, the weights "
                                         f"file has {arrays[j].shape}, the net expects "
                                         f"{blob.shape}", file=where, layer=layer.name,
                                         layer_type=layer.type)
                blob.data[...] = backend.to_module(arrays[j], blob.xp)
        ignored = [name for name in layers if name not in self.layer_dict]
        self._report_copy(where, list(layers), ignored, copied, strict)
        return ignored

    def __repr__(self) -> str:
        phase = caffe_pb2.Phase.Name(self.phase)
        return f"<Net '{self.name}' {len(self.layers)} layers, phase {phase}>"
