"""Upgrades of legacy net and solver formats to the current one (Caffe's upgrade_proto).

A net is brought up to date by a fixed sequence of steps, each of which checks whether it
applies and rewrites the message in place:

====================  ==========================================================================
step                  what it does (Caffe's function)
====================  ==========================================================================
V0 → V1               ``layers { layer { type: "conv" kernelsize ... } }``: ``padding`` layers
                      folded into the next conv/pool ``pad``; flat V0 fields moved to their
                      ``*_param`` per :data:`V0_FIELDS` (UpgradeV0Net)
data transform        ``scale``/``mean_file``/``crop_size``/``mirror`` of Data, ImageData and
                      WindowData moved to ``transform_param`` (UpgradeNetDataTransformation)
V1 → V2               ``layers { type: CONVOLUTION blobs_lr weight_decay param ... }`` →
                      ``layer { type: "Convolution" param { lr_mult decay_mult name } }``, every
                      ``*_param`` copied (UpgradeV1Net)
net input             net-level ``input``/``input_shape``/``input_dim`` → an ``Input`` layer named
                      "input" in front (UpgradeNetInput)
BatchNorm params      BatchNorm layers with 3 ``param`` blocks get lr_mult = decay_mult = 0
                      (UpgradeNetBatchNorm)
====================  ==========================================================================

Solvers: ``solver_type: ADAM`` (enum) → ``type: "Adam"`` (UpgradeSolverType).

Loading a net logs ONE line (logger ``netengine``, level WARNING) naming the steps applied;
``tools/upgrade_net`` and ``tools/upgrade_solver`` write the upgraded text. Deviation from Caffe,
on purpose: the data-transform step also moves those deprecated fields out of *V2* Data layers
(Caffe silently ignores them there; a value already set in transform_param wins), and reports
it in the same line.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from netengine.errors import LayerError, NetEngineError, SolverError
from netengine.formats.prototxt import layer_blocks, read_text_file
from netengine.proto import caffe_pb2

log = logging.getLogger("netengine")

V1 = caffe_pb2.V1LayerParameter

# -- tables ---------------------------------------------------------------------------------------
#: V1 enum name → V2 type string (Caffe's UpgradeV1LayerType).
V1_LAYER_TYPES: dict[str, str] = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

#: V0 type string → V1 enum name (Caffe's UpgradeV0LayerType). "padding" is folded away.
V0_LAYER_TYPES: dict[str, str] = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING", "relu": "RELU",
    "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS", "split": "SPLIT",
    "tanh": "TANH", "window_data": "WINDOW_DATA",
}

_ANY = "*"
_DATA_READERS = ("data", "hdf5_data", "images", "window_data")
#: V0 flat field → {V0 layer type (or "*"): "target_param.field" in the V1 layer}. A trailing
#: "[]" marks a repeated target (appended). Fields set on a type missing from the row are
#: reported as not upgradable, as Caffe does.
V0_FIELDS: dict[str, dict[str, str]] = {
    "num_output": {"conv": "convolution_param.num_output",
                   "innerproduct": "inner_product_param.num_output"},
    "biasterm": {"conv": "convolution_param.bias_term",
                 "innerproduct": "inner_product_param.bias_term"},
    "weight_filler": {"conv": "convolution_param.weight_filler",
                      "innerproduct": "inner_product_param.weight_filler"},
    "bias_filler": {"conv": "convolution_param.bias_filler",
                    "innerproduct": "inner_product_param.bias_filler"},
    "pad": {"conv": "convolution_param.pad[]", "pool": "pooling_param.pad"},
    "kernelsize": {"conv": "convolution_param.kernel_size[]", "pool": "pooling_param.kernel_size"},
    "group": {"conv": "convolution_param.group"},
    "stride": {"conv": "convolution_param.stride[]", "pool": "pooling_param.stride"},
    "pool": {"pool": "pooling_param.pool"},
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {"data": "data_param.source", "hdf5_data": "hdf5_data_param.source",
               "images": "image_data_param.source", "window_data": "window_data_param.source",
               "infogain_loss": "infogain_loss_param.source"},
    "scale": {_ANY: "transform_param.scale"},
    "meanfile": {_ANY: "transform_param.mean_file"},
    "batchsize": {"data": "data_param.batch_size", "hdf5_data": "hdf5_data_param.batch_size",
                  "images": "image_data_param.batch_size",
                  "window_data": "window_data_param.batch_size"},
    "cropsize": {_ANY: "transform_param.crop_size"},
    "mirror": {_ANY: "transform_param.mirror"},
    "rand_skip": {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}
#: V0 fields that are copied as lists rather than through V0_FIELDS.
_V0_LIST_FIELDS = ("blobs", "blobs_lr", "weight_decay")

#: Deprecated fields of the data readers' own parameters that belong in transform_param.
TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
TRANSFORM_OWNERS = {"DATA": "data_param", "IMAGE_DATA": "image_data_param",
                    "WINDOW_DATA": "window_data_param"}
_TRANSFORM_OWNERS_V2 = {"Data": "data_param", "ImageData": "image_data_param",
                        "WindowData": "window_data_param"}

#: Solver enum → type string (Caffe's UpgradeSolverType).
SOLVER_TYPES: dict[str, str] = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
                                "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam"}


# -- helpers --------------------------------------------------------------------------------------
def _set_path(message, path: str, value) -> None:
    """Set ``a_param.b`` (or append for ``a_param.b[]``) on ``message`` to ``value``."""
    owner, _, field = path.partition(".")
    target = getattr(message, owner)
    if not field:  # a whole message
        target.CopyFrom(value)
        return
    if field.endswith("[]"):
        getattr(target, field[:-2]).append(value)
    elif hasattr(value, "CopyFrom"):
        getattr(target, field).CopyFrom(value)
    else:
        setattr(target, field, value)


def _enum_name(message, field: str) -> str:
    descriptor = message.DESCRIPTOR.fields_by_name[field].enum_type
    return descriptor.values_by_number[getattr(message, field)].name


class _Report:
    """What the upgrade did: step names (for the one log line) and non-fatal problems."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.problems: list[str] = []

    def step(self, text: str) -> None:
        if text not in self.steps:
            self.steps.append(text)


# -- V0 → V1 --------------------------------------------------------------------------------------
def _needs_v0(param) -> bool:
    return any(layer.HasField("layer") for layer in param.layers)


def _fold_padding_layers(param, lines: list) -> list:
    """Remove V0 ``padding`` layers, giving their pad to the conv/pool layer that reads them."""
    last_top: dict[str, int] = {name: -1 for name in param.input}
    originals = list(param.layers)
    kept, kept_lines = [], []
    for i, connection in enumerate(originals):
        v0 = connection.layer
        line = lines[i] if i < len(lines) else None
        if v0.type != "padding":
            copy = V1()
            copy.CopyFrom(connection)
            kept.append(copy)
            kept_lines.append(line)
        for j, blob in enumerate(connection.bottom):
            if blob not in last_top:
                raise LayerError(f"unknown bottom blob '{blob}' (bottom {j}): no earlier layer "
                                 "produces it", line=line, layer=v0.name, layer_type=v0.type)
            source = last_top[blob]
            if source < 0 or originals[source].layer.type != "padding":
                continue
            pad_layer = originals[source]
            if v0.type not in ("conv", "pool"):
                raise LayerError(f"a V0 padding layer ('{pad_layer.layer.name}') feeds a "
                                 f"'{v0.type}' layer; only conv and pool layers can absorb "
                                 "padding", line=line, layer=v0.name, layer_type=v0.type)
            if (len(connection.bottom) != 1 or len(pad_layer.bottom) != 1
                    or len(pad_layer.top) != 1):
                raise LayerError(f"V0 padding layer '{pad_layer.layer.name}' must have one "
                                 "bottom and one top and feed a layer with one bottom",
                                 line=line, layer=v0.name, layer_type=v0.type)
            target = kept[-1]
            target.layer.pad = pad_layer.layer.pad
            target.bottom[j] = pad_layer.bottom[0]
        for blob in connection.top:
            last_top[blob] = i
    del param.layers[:]
    param.layers.extend(kept)
    return kept_lines


def _upgrade_v0_layer(connection, report: _Report) -> None:
    """Rewrite one ``layers { layer { ... } }`` connection as a flat V1 layer, in place."""
    v0 = connection.layer
    out = V1()
    out.bottom.extend(connection.bottom)
    out.top.extend(connection.top)
    if v0.HasField("name"):
        out.name = v0.name
    kind = v0.type
    if v0.HasField("type"):
        if kind not in V0_LAYER_TYPES:
            raise LayerError(f"unknown V0 layer type '{kind}'; V0 types are: "
                             f"{', '.join(sorted(V0_LAYER_TYPES))}", layer=v0.name,
                             layer_type=kind)
        out.type = V1.LayerType.Value(V0_LAYER_TYPES[kind])
    for field in _V0_LIST_FIELDS:
        getattr(out, field).extend(getattr(v0, field))
    for field, value in v0.ListFields():
        if field.name in ("name", "type") or field.name in _V0_LIST_FIELDS:
            continue
        targets = V0_FIELDS.get(field.name, {})
        target = targets.get(kind) or targets.get(_ANY)
        if target is None:
            report.problems.append(f"layer '{v0.name}': V0 field '{field.name}' has no meaning "
                                   f"for type '{kind}' and was dropped")
            continue
        if field.name == "pool":
            value = caffe_pb2.PoolingParameter.PoolMethod.Value(_enum_name(v0, "pool"))
        _set_path(out, target, value)
    connection.CopyFrom(out)


def _upgrade_v0(param, lines: list, report: _Report) -> list:
    lines = _fold_padding_layers(param, lines)
    for i, connection in enumerate(param.layers):
        try:
            _upgrade_v0_layer(connection, report)
        except NetEngineError as err:
            raise err.with_context(line=lines[i] if i < len(lines) else None) from None
    report.step("V0 layers → V1")
    return lines


# -- data transformation --------------------------------------------------------------------------
def _move_transform_fields(layer, owner_field: str, overwrite: bool = True) -> bool:
    """Move the deprecated fields; with ``overwrite=False`` a value already set in
    transform_param wins (the deprecated copy is dropped), as Caffe reads only that one."""
    owner = getattr(layer, owner_field)
    moved = False
    for field in TRANSFORM_FIELDS:
        if owner.HasField(field):
            if overwrite or not layer.transform_param.HasField(field):
                setattr(layer.transform_param, field, getattr(owner, field))
            owner.ClearField(field)
            moved = True
    return moved


def _upgrade_data_transform(param, report: _Report) -> None:
    for layer in param.layers:
        if layer.HasField("type"):
            owner = TRANSFORM_OWNERS.get(V1.LayerType.Name(layer.type))
            if owner and _move_transform_fields(layer, owner):
                report.step("data-layer transform fields → transform_param")
    for layer in param.layer:
        owner = _TRANSFORM_OWNERS_V2.get(layer.type)
        if owner and _move_transform_fields(layer, owner, overwrite=False):
            report.step("data-layer transform fields → transform_param")


# -- V1 → V2 --------------------------------------------------------------------------------------
_V1_PLAIN = ("bottom", "top", "include", "exclude", "blobs", "loss_weight")
_V1_SPECIAL = {"name", "type", "param", "blob_share_mode", "blobs_lr", "weight_decay", "layer"}
_LAYER_FIELDS = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name


def upgrade_v1_layer(v1) -> caffe_pb2.LayerParameter:
    """One V1 ``layers`` entry as a V2 LayerParameter (Caffe's UpgradeV1LayerParameter)."""
    layer = caffe_pb2.LayerParameter()
    if v1.HasField("layer"):
        raise LayerError("a V0 'layer { }' block is left inside a V1 'layers' entry",
                         layer=v1.name)
    if v1.HasField("name"):
        layer.name = v1.name
    if v1.HasField("type"):
        layer.type = V1_LAYER_TYPES[V1.LayerType.Name(v1.type)]
    for field in _V1_PLAIN:
        getattr(layer, field).extend(getattr(v1, field))

    def spec(i: int):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(
            V1.DimCheckMode.Name(mode))
    for i, value in enumerate(v1.blobs_lr):
        spec(i).lr_mult = value
    for i, value in enumerate(v1.weight_decay):
        spec(i).decay_mult = value
    for field, value in v1.ListFields():
        if field.name in _V1_SPECIAL or field.name in _V1_PLAIN:
            continue
        if field.name.endswith("_param") and field.name in _LAYER_FIELDS:
            getattr(layer, field.name).CopyFrom(value)
    return layer


def _upgrade_v1(param, report: _Report) -> None:
    layers = [upgrade_v1_layer(v1) for v1 in param.layers]
    del param.layers[:]
    param.layer.extend(layers)
    report.step("V1 'layers' → 'layer'")


# -- net-level inputs, BatchNorm ------------------------------------------------------------------
def _upgrade_net_input(param, lines: list, report: _Report) -> list:
    """Net-level input / input_shape / input_dim → an Input layer named 'input' in front.

    An ``input`` without shapes (as in old caffemodels) is simply dropped, as in Caffe.
    """
    if not param.input:
        return lines
    if param.input_dim and len(param.input_dim) != 4 * len(param.input):
        raise NetEngineError(f"input_dim must give 4 values per input: {len(param.input)} "
                             f"input(s), {len(param.input_dim)} input_dim value(s)")
    if param.input_shape and len(param.input_shape) not in (1, len(param.input)):
        raise NetEngineError(f"input_shape must be given once per input: {len(param.input)} "
                             f"input(s), {len(param.input_shape)} input_shape(s)")
    if param.input_shape or param.input_dim:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(param.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if param.input_shape:
                shape.CopyFrom(param.input_shape[i if len(param.input_shape) > 1 else 0])
            else:
                shape.dim.extend(param.input_dim[4 * i:4 * i + 4])
        existing = list(param.layer)
        del param.layer[:]
        param.layer.append(layer)
        param.layer.extend(existing)
        lines = [None] + list(lines)
    del param.input[:]
    del param.input_shape[:]
    del param.input_dim[:]
    report.step("net-level inputs → Input layer")
    return lines


def _upgrade_batch_norm(param, report: _Report) -> None:
    for layer in param.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            if all(s.lr_mult == 0 and s.decay_mult == 0 and s.HasField("lr_mult")
                   and s.HasField("decay_mult") for s in layer.param):
                continue
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
            report.step("BatchNorm param blocks → lr_mult = decay_mult = 0")


# -- entry points ---------------------------------------------------------------------------------
def _first_block_lines(file: str | None) -> dict[str, int]:
    if not file:
        return {}

    try:
        blocks = layer_blocks(read_text_file(file))
    except NetEngineError:
        return {}
    first: dict[str, int] = {}
    for block in blocks:
        first.setdefault(block.keyword, block.line)
    return first


def check_not_mixed(param, file: str | None = None) -> None:
    """Refuse a net holding both ``layer`` and ``layers`` blocks, as Caffe does."""
    if len(param.layer) and len(param.layers):
        first = _first_block_lines(file)
        where = ""
        if first:
            where = (f" (first 'layer' at line {first.get('layer', '?')}, first 'layers' at "
                     f"line {first.get('layers', '?')})")
        raise NetEngineError(
            f"the net mixes current 'layer {{ type: \"...\" }}' blocks with legacy V1 'layers' "
            f"blocks{where}; BVLC Caffe refuses such nets: rewrite the 'layers' blocks in the "
            "'layer' format", file=file, line=first.get("layers"))


def net_needs_upgrade(param) -> bool:
    """Whether :func:`upgrade_net` would change ``param``."""
    probe = caffe_pb2.NetParameter()
    probe.CopyFrom(param)
    report = _Report()
    _apply(probe, [], None, report)
    return bool(report.steps)


def _apply(param, lines: list, file: str | None, report: _Report) -> list:
    check_not_mixed(param, file)
    if _needs_v0(param):
        lines = _upgrade_v0(param, lines, report)
    _upgrade_data_transform(param, report)
    if len(param.layers):
        _upgrade_v1(param, report)
    lines = _upgrade_net_input(param, lines, report)
    _upgrade_batch_norm(param, report)
    return lines


def upgrade_net(param, lines: list | None = None, file: str | None = None,
                notify: Callable[[str], None] | None = None):
    """Bring ``param`` (a NetParameter, changed in place) to the current format.

    ``lines`` holds the source line of each layer block as read (``layers`` blocks for a V0/V1
    net, ``layer`` blocks otherwise); returns ``(param, lines)`` with one line per resulting
    layer (None where a layer has no block of its own). Logs one line when anything changed.
    """
    lines = list(lines or [])
    report = _Report()
    try:
        lines = _apply(param, lines, file, report)
    except NetEngineError as err:
        raise err.with_context(file=file) from None
    if report.steps:
        text = (f"{file or 'net'}: upgraded from a legacy format ({'; '.join(report.steps)})"
                + (f"; problems: {'; '.join(report.problems)}" if report.problems else "")
                + "; tools/upgrade_net writes the upgraded file")
        (notify or log.warning)(text)
    return param, lines


def upgrade_solver(param, file: str | None = None,
                   notify: Callable[[str], None] | None = None):
    """``solver_type`` enum → ``type`` string (Caffe's UpgradeSolverAsNeeded); in place.

    Also upgrades an inline ``net_param`` / ``train_net_param`` / ``test_net_param``.
    """
    steps = []
    if param.HasField("solver_type"):
        if param.HasField("type"):
            raise SolverError("the solver gives both the old 'solver_type' (enum) and the new "
                              "'type' (string); keep only 'type'", file=file)
        param.type = SOLVER_TYPES[_enum_name(param, "solver_type")]
        param.ClearField("solver_type")
        steps.append(f"solver_type → type: \"{param.type}\"")
    nets = ([param.net_param] if param.HasField("net_param") else []) + (
        [param.train_net_param] if param.HasField("train_net_param") else []) + list(
        param.test_net_param)
    for net in nets:
        report = _Report()
        try:
            _apply(net, [], file, report)
        except NetEngineError as err:
            raise err.with_context(file=file) from None
        if report.steps:
            steps.append("inline net: " + ", ".join(report.steps))
    if steps:
        (notify or log.warning)(f"{file or 'solver'}: upgraded from a legacy format "
                                f"({'; '.join(steps)}); tools/upgrade_solver writes the "
                                "upgraded file")
    return param
