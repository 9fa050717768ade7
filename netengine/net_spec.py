"""NetSpec: write Caffe nets in Python and get a NetParameter (pycaffe's ``net_spec``).

    from netengine import net_spec
    L, P = net_spec.layers, net_spec.params
    n = net_spec.NetSpec()
    n.data, n.label = L.Data(source="mnist_lmdb", batch_size=64, backend=P.Data.LMDB,
                             transform_param=dict(scale=1 / 256), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    print(n.to_proto())          # a caffe_pb2.NetParameter; str() of it is prototxt

``layers.<Type>(*bottoms, **kwargs)`` makes one layer of prototxt type ``<Type>`` and returns
its top (a tuple of tops when ``ntop`` > 1, the layer itself when ``ntop`` is 0).
Keyword arguments are routed as pycaffe routes them:

* a name ending in ``param`` (``param=[dict(lr_mult=1)]``, ``transform_param=...``,
  ``loss_param=...``) is a LayerParameter field;
* any other name is looked up in the type's own ``<type>_param`` message (found from the proto
  descriptor: field ``x_param`` of message ``XParameter`` serves type ``X``), then in the
  messages the type also reads (Deconvolution reads convolution_param, SoftmaxWithLoss reads
  softmax_param and loss_param, ...), then in LayerParameter itself (``include``,
  ``loss_weight``, ``propagate_down``, ``name``, ...);
* special: ``ntop`` (number of tops, default 1), ``in_place`` (tops = bottoms), ``name``
  (the layer's name instead of its first top's name).

Values: repeated fields take a list (or one value), message fields a dict (or a message),
enum fields an int or the value's name (``pool="MAX"``). Mistakes raise a one-line error at the
call site naming the field and the close matches.

Names: a layer is named after its first top; a top after the NetSpec attribute it is assigned
to; anything never assigned is auto-named ``<Type><k>`` (``Convolution1``). Assigning the same
attribute twice (``n.data`` for a TRAIN and a TEST data layer) keeps both layers, in order,
with the same top name, as Caffe's own LeNet file does; later uses read the newest.
"""
from __future__ import annotations

import difflib
from collections import Counter, OrderedDict

from google.protobuf import message as pb_message
from google.protobuf import text_format

from netengine.errors import NetEngineError
from netengine.formats.prototxt import write_atomic
from netengine.proto import caffe_pb2

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

_LAYER = caffe_pb2.LayerParameter.DESCRIPTOR

# Message fields a layer type reads besides its own ``<type>_param`` (facts of Caffe's layer
# code: the loss layers' normalisation lives in loss_param, Deconvolution shares
# convolution_param, the recurrent layers share recurrent_param).
ALSO_READS: dict[str, tuple[str, ...]] = {
    "Deconvolution": ("convolution_param",),
    "SoftmaxWithLoss": ("softmax_param", "loss_param"),
    "SigmoidCrossEntropyLoss": ("loss_param",),
    "InfogainLoss": ("loss_param",),
    "RNN": ("recurrent_param",),
    "LSTM": ("recurrent_param",),
}


class NetSpecError(NetEngineError):
    """A NetSpec layer given a parameter its messages do not have, or a value of the wrong kind."""


def param_name_dict() -> dict[str, str]:
    """Layer type → its own LayerParameter field, derived from the proto descriptor.

    Field ``x_param`` whose message is ``XParameter`` serves layer type ``X`` (pycaffe's rule):
    ``Convolution`` → ``convolution_param``, ``InnerProduct`` → ``inner_product_param``.
    """
    names = {}
    for field in _LAYER.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names[type_name[: -len("Parameter")]] = field.name
    return names


_PARAM_NAMES = param_name_dict()


def param_fields(type_name: str) -> list[str]:
    """The LayerParameter message fields a ``type_name`` layer's keywords are routed to."""
    own = _PARAM_NAMES.get(type_name)
    return ([own] if own else []) + [f for f in ALSO_READS.get(type_name, ()) if f != own]


# -- assigning Python values to messages --------------------------------------------------------
def _enum_value(field, value, where: str):
    if isinstance(value, str):
        found = field.enum_type.values_by_name.get(value)
        if found is None:
            names = ", ".join(v.name for v in field.enum_type.values)
            raise NetSpecError(f"{where}: '{value}' is not a value of {field.enum_type.name} "
                               f"({names})")
        return found.number
    return value


def _scalar(field, value, where: str):
    if field.type == field.TYPE_ENUM:
        return _enum_value(field, value, where)
    if field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE) and isinstance(value, int) \
            and not isinstance(value, bool):
        return float(value)
    return value


def assign(message: pb_message.Message, name: str, value, where: str = "") -> None:
    """Set field ``name`` of ``message`` from a Python value (lists, dicts, messages, scalars)."""
    where = f"{where}.{name}" if where else name
    field = message.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise NetSpecError(f"{message.DESCRIPTOR.name} has no field '{name}'"
                           f"{_suggest(name, message.DESCRIPTOR.fields_by_name)}")
    container = getattr(message, name)
    try:
        if field.is_repeated:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            for item in values:
                if field.message_type is not None:
                    _fill(container.add(), item, where)
                else:
                    container.append(_scalar(field, item, where))
        elif field.message_type is not None:
            _fill(container, value, where)
        else:
            setattr(message, name, _scalar(field, value, where))
    except (TypeError, ValueError) as err:
        raise NetSpecError(f"{where}: cannot take {value!r}: {err}") from None


def _fill(message: pb_message.Message, value, where: str) -> None:
    if isinstance(value, pb_message.Message):
        message.CopyFrom(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            assign(message, key, item, where)
    else:
        raise NetSpecError(f"{where}: expected a dict or a {message.DESCRIPTOR.name} message, "
                           f"got {value!r}")


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


# -- the graph ----------------------------------------------------------------------------------
class Top:
    """One top blob of a layer spec: pass it as a bottom to later layers."""

    def __init__(self, fn: LayerSpec, n: int) -> None:
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """A NetParameter with this top's layer and everything it depends on."""
        return _net_proto([(None, self)])

    def _to_proto(self, layers, names, autonames) -> None:
        self.fn._to_proto(layers, names, autonames)

    def __repr__(self) -> str:
        return f"<Top {self.n} of {self.fn.type_name}>"


class LayerSpec:
    """A layer to be: its type, bottoms and parameters (the LayerParameter minus names)."""

    def __init__(self, type_name: str, inputs: tuple, params: dict) -> None:
        self.type_name = type_name
        params = dict(params)
        self.ntop = int(params.pop("ntop", 1))
        self.in_place = bool(params.pop("in_place", False))
        for i, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise NetSpecError(f"layers.{type_name}: bottom {i} must be a top of an earlier "
                                   f"layer (a Top), got {bottom!r}")
        if self.in_place and self.ntop != len(inputs):
            raise NetSpecError(f"layers.{type_name}: in_place needs as many tops as bottoms "
                               f"({len(inputs)} bottom(s), ntop={self.ntop})")
        self.inputs = tuple(inputs)
        self.proto = caffe_pb2.LayerParameter(type=type_name)
        for key, value in params.items():
            self._route(key, value)
        self.tops = tuple(Top(self, k) for k in range(self.ntop))

    def _route(self, key: str, value) -> None:
        where = f"layers.{self.type_name}"
        if key in ("bottom", "top"):
            raise NetSpecError(f"{where}: pass bottoms as arguments and name tops by assigning "
                               f"them to the NetSpec, not with '{key}='")
        if key.endswith("param") or key == "name":
            target = self.proto
        else:
            target = None
            for field in param_fields(self.type_name):
                if key in getattr(self.proto, field).DESCRIPTOR.fields_by_name:
                    target = getattr(self.proto, field)
                    where = f"{where} {field}"
                    break
            if target is None and key in _LAYER.fields_by_name:
                target = self.proto
        if target is None:
            places = param_fields(self.type_name) + ["LayerParameter"]
            known = [f.name for f in _LAYER.fields]
            for field in param_fields(self.type_name):
                known += list(getattr(self.proto, field).DESCRIPTOR.fields_by_name)
            raise NetSpecError(f"{where}: no parameter '{key}' in {' or '.join(places)}"
                               f"{_suggest(key, known)}")
        assign(target, key, value, where)

    def _name(self, names, autonames) -> str:
        if self not in names:
            names[self] = (self._top_name(self.tops[0], names, autonames) if self.ntop
                           else _autoname(self.type_name, autonames))
        return names[self]

    @staticmethod
    def _top_name(top: Top, names, autonames) -> str:
        if top not in names:
            names[top] = _autoname(top.fn.type_name, autonames)
        return names[top]

    def _to_proto(self, layers, names, autonames) -> None:
        if self in layers:
            return
        bottoms = []
        for top in self.inputs:
            top._to_proto(layers, names, autonames)
            bottoms.append(layers[top.fn].top[top.n])
        layer = caffe_pb2.LayerParameter()
        layer.CopyFrom(self.proto)
        layer.ClearField("bottom")
        layer.ClearField("top")
        layer.bottom.extend(bottoms)
        if self.in_place:
            layer.top.extend(bottoms)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        if not self.proto.HasField("name"):
            layer.name = self._name(names, autonames)
        layers[self] = layer

    def __repr__(self) -> str:
        return f"<LayerSpec {self.type_name}>"


def _autoname(type_name: str, autonames: Counter) -> str:
    autonames[type_name] += 1
    return f"{type_name}{autonames[type_name]}"


def _net_proto(assigned, name: str | None = None) -> caffe_pb2.NetParameter:
    names: dict = {}
    for key, value in assigned:
        if key is not None:
            names[value] = key
    autonames: Counter = Counter()
    layers: OrderedDict = OrderedDict()
    for _, value in assigned:
        value._to_proto(layers, names, autonames)
    net = caffe_pb2.NetParameter()
    if name:
        net.name = name
    net.layer.extend(layers.values())
    return net


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """pycaffe's ``to_proto(*tops)``: a NetParameter with these tops' layers and ancestors."""
    return _net_proto([(None, top) for top in tops])


class NetSpec:
    """Named tops, assigned as attributes (``n.conv1 = layers.Convolution(...)``)."""

    def __init__(self, name: str | None = None) -> None:
        object.__setattr__(self, "_assigned", [])
        object.__setattr__(self, "_tops", OrderedDict())
        object.__setattr__(self, "_net_name", name)

    def __setattr__(self, name: str, value) -> None:
        if not isinstance(value, (Top, LayerSpec)):
            raise NetSpecError(f"NetSpec.{name} must be a layer's top (from net_spec.layers), "
                               f"got {value!r}")
        self._assigned.append((name, value))
        self._tops[name] = value

    def __getattr__(self, name: str):
        tops = object.__getattribute__(self, "_tops")
        if name in tops:
            return tops[name]
        raise AttributeError(f"NetSpec has no top '{name}' (assigned: "
                             f"{', '.join(tops) or 'none'})")

    __setitem__ = __setattr__

    def __getitem__(self, name: str):
        return self.__getattr__(name)

    def __contains__(self, name: str) -> bool:
        return name in self._tops

    @property
    def tops(self) -> OrderedDict:
        """The newest top assigned under each name, in first-assignment order."""
        return OrderedDict(self._tops)

    def to_proto(self, name: str | None = None) -> caffe_pb2.NetParameter:
        """The net as a NetParameter (every assigned top, its layer and their ancestors)."""
        return _net_proto(self._assigned, name or self._net_name)

    def to_prototxt(self, name: str | None = None) -> str:
        return text_format.MessageToString(self.to_proto(name))

    def save(self, path, name: str | None = None) -> None:
        """Write the net as prototxt (atomically)."""
        write_atomic(path, self.to_prototxt(name))

    def __str__(self) -> str:
        return self.to_prototxt()


class _Layers:
    """``layers.<Type>(*bottoms, **kwargs)`` for any prototxt type string."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def make(*bottoms, **kwargs):
            fn = LayerSpec(type_name, bottoms, kwargs)
            if fn.ntop == 0:
                return fn
            return fn.tops[0] if fn.ntop == 1 else fn.tops

        make.__name__ = type_name
        return make


class _Params:
    """``params.<Type>`` is the ``<Type>Parameter`` message class, for enum values
    (``params.Pooling.MAX``, ``params.Data.LMDB``)."""

    def __getattr__(self, type_name: str):
        cls = getattr(caffe_pb2, f"{type_name}Parameter", None)
        if cls is None:
            raise AttributeError(f"the proto has no message {type_name}Parameter")
        return cls


layers = _Layers()
params = _Params()

__all__ = ["TEST", "TRAIN", "LayerSpec", "NetSpec", "NetSpecError", "Top", "layers", "params",
           "param_name_dict", "param_fields", "assign", "to_proto"]
