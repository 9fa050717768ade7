"""Export a deploy net with its weights to ONNX (opset 13), for the layers whose ONNX
equivalents compute exactly what Caffe computes.

    from netengine.net import Net
    from netengine.formats.onnx import export
    export(Net("deploy.prototxt", weights="w.caffemodel"), "net.onnx")

The net is built first (TEST phase), so every shape is known and fixed: the ONNX graph has the
net's input shapes, its weights as initializers and one tensor per blob (in-place layers get
fresh tensor names, ``<blob>_<layer>``). Mappings and the Caffe conventions they honour:

* Convolution → Conv, Deconvolution → ConvTranspose (Caffe's weight layouts are ONNX's; floor
  rounding of the output size is ONNX's default). ``axis`` must be 1.
* Pooling MAX/AVE → MaxPool/AveragePool with Caffe's output size: Caffe rounds up and drops a
  last window that would start in the far padding; MAX gets explicit end pads that give exactly
  that many windows (``ceil_mode`` 0), AVE keeps Caffe's pads (the divisor counts padded cells
  up to H + pad, as ``count_include_pad`` does) and takes ``ceil_mode`` 1 where Caffe's size is
  the rounded-up one. Global pooling → GlobalMaxPool/GlobalAveragePool. STOCHASTIC: refused.
* LRN ACROSS_CHANNELS → LRN (Caffe's k + alpha/n·Σx² is ONNX's bias + alpha/size·Σx²);
  WITHIN_CHANNEL → x·(1 + alpha·avgpool_{n×n}(x²))^−beta (k is ignored, as in Caffe).
* BatchNorm (global statistics: the stored sums divided by the stored scale factor) →
  BatchNormalization with scale 1 and bias 0; Scale/Bias → Mul/Add with the learned blob (or the
  second bottom) shaped for broadcasting. TRAIN-mode BatchNorm (batch statistics) is refused.
* InnerProduct → Flatten(axis) + Gemm (transB unless ``transpose``), reshaped back for axis > 1.
* ReLU → Relu/LeakyRelu, PReLU → PRelu, ELU → Elu, Sigmoid, TanH → Tanh, AbsVal → Abs,
  BNLL → Softplus, Power/Exp/Log → their arithmetic, Softmax(axis), Concat, Slice → Split,
  Crop → Slice, Eltwise SUM (with coefficients)/PROD/MAX → Sum/Mul/Max, Flatten/Reshape →
  Reshape to the known shape, Dropout → Identity (TEST phase), Split → nothing.

Any other type stops the export with a one-line error naming the layer. Needs the optional
``onnx`` package; ``verify`` also needs ``onnxruntime``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from netengine import backend
from netengine.errors import LayerError, NetEngineError
from netengine.formats.prototxt import write_atomic
from netengine.ops.pool_ops import pooled_size
from netengine.proto import caffe_pb2

OPSET = 13
CONVERTERS: dict[str, Callable] = {}


def converts(*types: str):
    def register(fn):
        for name in types:
            CONVERTERS[name] = fn
        return fn
    return register


def _onnx():
    try:
        import onnx
    except ImportError:
        raise NetEngineError("ONNX export needs the onnx package, which is not installed "
                             "(pip install onnx)") from None
    return onnx


class Graph:
    """The ONNX graph being built: nodes, initializers, and blob name → current tensor name."""

    def __init__(self, net) -> None:
        self.onnx = _onnx()
        self.net = net
        self.nodes: list = []
        self.initializers: list = []
        self.current: dict[str, str] = {}
        self.taken: set[str] = set()

    def fresh(self, hint: str) -> str:
        name, k = hint, 1
        while name in self.taken:
            k += 1
            name = f"{hint}_{k}"
        self.taken.add(name)
        return name

    def tensor(self, blob: str) -> str:
        return self.current[blob]

    def define(self, blob: str, layer_name: str) -> str:
        """A new tensor for ``blob`` (a fresh name when an earlier layer already wrote it)."""
        name = self.fresh(blob if blob not in self.taken else f"{blob}_{layer_name}")
        self.current[blob] = name
        return name

    def const(self, hint: str, array, dtype=np.float32) -> str:
        name = self.fresh(hint)
        host = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        self.initializers.append(self.onnx.numpy_helper.from_array(host, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        self.nodes.append(self.onnx.helper.make_node(op, inputs, outputs, name=name, **attrs))

    def temp(self, hint: str) -> str:
        return self.fresh(hint)


class Ctx:
    """One layer's view: its param, learned blobs (host arrays), bottom/top names and shapes."""

    def __init__(self, graph: Graph, index: int) -> None:
        net = graph.net
        self.graph = graph
        self.layer = net.layers[index]
        self.param = self.layer.layer_param
        self.name = self.layer.name
        self.blobs = [backend.to_host(b.data).astype(np.float32) for b in self.layer.blobs]
        self.bottom_blobs = list(net.bottom_ids[index])
        self.top_blobs = list(net.top_ids[index])
        self.bottoms = [graph.tensor(b) for b in self.bottom_blobs]
        self.bottom_shapes = [tuple(net.blobs[b].shape) for b in self.bottom_blobs]
        self.top_shapes = [tuple(net.blobs[t].shape) for t in self.top_blobs]

    def fail(self, message: str) -> LayerError:
        return LayerError(f"cannot export to ONNX: {message}", layer=self.name,
                          layer_type=self.param.type)

    def tops(self) -> list[str]:
        return [self.graph.define(t, self.name) for t in self.top_blobs]

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        self.graph.node(op, inputs, outputs, self.graph.fresh(self.name), **attrs)

    def const(self, suffix: str, array, dtype=np.float32) -> str:
        return self.graph.const(f"{self.name}_{suffix}", array, dtype)

    def temp(self, suffix: str) -> str:
        return self.graph.temp(f"{self.name}_{suffix}")

    def shape_const(self, shape) -> str:
        return self.const("shape", np.array(shape, dtype=np.int64), np.int64)


def _canonical(axis: int, ndim: int, ctx: Ctx, what: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ctx.fail(f"{what} {axis} is out of range for {ndim} axes")
    return axis % ndim


def _broadcast(array: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """``array`` (the dims of axes axis…) with trailing ones so it broadcasts from ``axis``."""
    return array.reshape(array.shape + (1,) * (ndim - axis - array.ndim))


# -- converters ---------------------------------------------------------------------------------
@converts("Split")
def _split(ctx: Ctx) -> None:
    for blob in ctx.top_blobs:
        ctx.graph.current[blob] = ctx.bottoms[0]


@converts("Silence")
def _silence(ctx: Ctx) -> None:
    pass


@converts("Dropout")
def _dropout(ctx: Ctx) -> None:
    ctx.node("Identity", ctx.bottoms, ctx.tops())


@converts("Convolution", "Deconvolution")
def _conv(ctx: Ctx) -> None:
    p = ctx.param.convolution_param
    if p.axis != 1:
        raise ctx.fail(f"convolution_param.axis must be 1 (channels), got {p.axis}")
    weight = ctx.blobs[0]
    n = weight.ndim - 2

    def per_axis(field: str, default: int) -> list[int]:
        h, w = f"{field}_h", f"{field}_w"
        if p.HasField(h) or p.HasField(w):
            return [getattr(p, h), getattr(p, w)]
        values = list(getattr(p, field if field != "kernel" else "kernel_size"))
        return values * n if len(values) == 1 else (values or [default] * n)

    pads = per_axis("pad", 0)
    attrs = dict(kernel_shape=list(weight.shape[2:]), strides=per_axis("stride", 1),
                 pads=pads + pads, dilations=list(p.dilation) * n if len(p.dilation) == 1
                 else (list(p.dilation) or [1] * n), group=p.group)
    inputs = ctx.bottoms[:1] + [ctx.const("weight", weight)]
    if p.bias_term:
        inputs.append(ctx.const("bias", ctx.blobs[1]))
    if len(ctx.bottoms) != 1:
        raise ctx.fail("only single-bottom convolutions are exported")
    op = "Conv" if ctx.param.type == "Convolution" else "ConvTranspose"
    ctx.node(op, inputs, ctx.tops(), **attrs)


@converts("Pooling")
def _pooling(ctx: Ctx) -> None:
    p = ctx.param.pooling_param
    P = caffe_pb2.PoolingParameter
    if p.pool not in (P.MAX, P.AVE):
        raise ctx.fail("STOCHASTIC pooling has no ONNX equivalent")
    if len(ctx.top_blobs) != 1:
        raise ctx.fail("the argmax mask top of MAX pooling has no exact ONNX equivalent")
    if len(ctx.bottom_shapes[0]) != 4:
        raise ctx.fail("pooling input must have 4 axes")
    if p.global_pooling:
        op = "GlobalMaxPool" if p.pool == P.MAX else "GlobalAveragePool"
        ctx.node(op, ctx.bottoms, ctx.tops())
        return

    def pair(field: str, default: int) -> list[int]:
        h, w = f"{field}_h", f"{field}_w"
        if p.HasField(h) or p.HasField(w):
            return [getattr(p, h), getattr(p, w)]
        name = "kernel_size" if field == "kernel" else field
        return [getattr(p, name) if p.HasField(name) else default] * 2

    kernel, stride, pad = pair("kernel", 0), pair("stride", 1), pair("pad", 0)
    sizes = ctx.bottom_shapes[0][2:]
    ceil = p.round_mode == P.CEIL
    caffe = [pooled_size(h, k, s, q, ceil, any(pad)) for h, k, s, q in
             zip(sizes, kernel, stride, pad)]
    if tuple(caffe) != ctx.top_shapes[0][2:]:
        raise ctx.fail(f"pooled size {caffe} differs from the net's {ctx.top_shapes[0][2:]}")
    floor_out = [(h + 2 * q - k) // s + 1 for h, k, s, q in zip(sizes, kernel, stride, pad)]
    if p.pool == P.MAX:
        # Padding never wins a max: end pads that give exactly Caffe's windows.
        ends = [max(q, (o - 1) * s + k - h - q) for o, h, k, s, q in
                zip(caffe, sizes, kernel, stride, pad)]
        ctx.node("MaxPool", ctx.bottoms, ctx.tops(), kernel_shape=kernel, strides=stride,
                 pads=pad + ends)
        return
    ceil_out = [math.ceil((h + 2 * q - k) / s) + 1 for h, k, s, q in
                zip(sizes, kernel, stride, pad)]
    if caffe == floor_out:
        mode = 0
    elif caffe == ceil_out:
        mode = 1
    else:
        raise ctx.fail(f"AVE pooling to {caffe} mixes rounded-up and rounded-down axes")
    ctx.node("AveragePool", ctx.bottoms, ctx.tops(), kernel_shape=kernel, strides=stride,
             pads=pad + pad, ceil_mode=mode, count_include_pad=1)


@converts("InnerProduct")
def _inner_product(ctx: Ctx) -> None:
    p = ctx.param.inner_product_param
    shape = ctx.bottom_shapes[0]
    axis = _canonical(p.axis, len(shape), ctx)
    x = ctx.bottoms[0]
    if len(shape) != 2 or axis != 1:
        flat = ctx.temp("flat")
        ctx.node("Flatten", [x], [flat], axis=axis)
        x = flat
    inputs = [x, ctx.const("weight", ctx.blobs[0])]
    if p.bias_term:
        inputs.append(ctx.const("bias", ctx.blobs[1]))
    top_shape = ctx.top_shapes[0]
    if len(top_shape) == 2:
        ctx.node("Gemm", inputs, ctx.tops(), transB=0 if p.transpose else 1)
        return
    out = ctx.temp("gemm")
    ctx.node("Gemm", inputs, [out], transB=0 if p.transpose else 1)
    ctx.node("Reshape", [out, ctx.shape_const(top_shape)], ctx.tops())


@converts("ReLU")
def _relu(ctx: Ctx) -> None:
    slope = ctx.param.relu_param.negative_slope
    if slope == 0:
        ctx.node("Relu", ctx.bottoms, ctx.tops())
    else:
        ctx.node("LeakyRelu", ctx.bottoms, ctx.tops(), alpha=slope)


@converts("PReLU")
def _prelu(ctx: Ctx) -> None:
    ndim = len(ctx.bottom_shapes[0])
    slope = ctx.blobs[0]
    if slope.size != 1 or not ctx.param.prelu_param.channel_shared:
        slope = _broadcast(slope, 1, ndim)
    ctx.node("PRelu", [ctx.bottoms[0], ctx.const("slope", slope)], ctx.tops())


@converts("ELU")
def _elu(ctx: Ctx) -> None:
    ctx.node("Elu", ctx.bottoms, ctx.tops(), alpha=ctx.param.elu_param.alpha)


for _caffe, _onnx_op in (("Sigmoid", "Sigmoid"), ("TanH", "Tanh"), ("AbsVal", "Abs"),
                         ("BNLL", "Softplus")):
    def _unary(ctx: Ctx, op=_onnx_op) -> None:
        ctx.node(op, ctx.bottoms, ctx.tops())
    converts(_caffe)(_unary)


def _affine(ctx: Ctx, x: str, scale: float, shift: float) -> str:
    """scale·x + shift as nodes (skipping the identities)."""
    if scale != 1:
        out = ctx.temp("scaled")
        ctx.node("Mul", [x, ctx.const("scale", np.float32(scale))], [out])
        x = out
    if shift != 0:
        out = ctx.temp("shifted")
        ctx.node("Add", [x, ctx.const("shift", np.float32(shift))], [out])
        x = out
    return x


@converts("Power")
def _power(ctx: Ctx) -> None:
    p = ctx.param.power_param
    top = ctx.tops()
    if p.power == 1:
        inner = _affine(ctx, ctx.bottoms[0], p.scale, p.shift)
        ctx.node("Identity", [inner], top)
        return
    inner = _affine(ctx, ctx.bottoms[0], p.scale, p.shift)
    ctx.node("Pow", [inner, ctx.const("power", np.float32(p.power))], top)


@converts("Exp")
def _exp(ctx: Ctx) -> None:
    p = ctx.param.exp_param
    natural = p.base == -1
    inner_scale = p.scale if natural else p.scale * math.log(p.base)
    outer = math.exp(p.shift) if natural else p.base ** p.shift
    inner = _affine(ctx, ctx.bottoms[0], inner_scale, 0.0)
    if outer == 1:
        ctx.node("Exp", [inner], ctx.tops())
        return
    exp = ctx.temp("exp")
    ctx.node("Exp", [inner], [exp])
    ctx.node("Mul", [exp, ctx.const("outer", np.float32(outer))], ctx.tops())


@converts("Log")
def _log(ctx: Ctx) -> None:
    p = ctx.param.log_param
    inner = _affine(ctx, ctx.bottoms[0], p.scale, p.shift)
    if p.base == -1:
        ctx.node("Log", [inner], ctx.tops())
        return
    log = ctx.temp("log")
    ctx.node("Log", [inner], [log])
    ctx.node("Mul", [log, ctx.const("base", np.float32(1 / math.log(p.base)))], ctx.tops())


@converts("Softmax")
def _softmax(ctx: Ctx) -> None:
    axis = _canonical(ctx.param.softmax_param.axis, len(ctx.bottom_shapes[0]), ctx)
    ctx.node("Softmax", ctx.bottoms, ctx.tops(), axis=axis)


@converts("Concat")
def _concat(ctx: Ctx) -> None:
    p = ctx.param.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    axis = _canonical(axis, len(ctx.bottom_shapes[0]), ctx)
    ctx.node("Concat", ctx.bottoms, ctx.tops(), axis=axis)


@converts("Slice")
def _slice(ctx: Ctx) -> None:
    p = ctx.param.slice_param
    axis = p.slice_dim if p.HasField("slice_dim") else p.axis
    axis = _canonical(axis, len(ctx.bottom_shapes[0]), ctx)
    sizes = np.array([shape[axis] for shape in ctx.top_shapes], dtype=np.int64)
    ctx.node("Split", [ctx.bottoms[0], ctx.const("split", sizes, np.int64)], ctx.tops(),
             axis=axis)


@converts("Crop")
def _crop(ctx: Ctx) -> None:
    p = ctx.param.crop_param
    shape, target = ctx.bottom_shapes[0], ctx.top_shapes[0]
    axis = _canonical(p.axis, len(shape), ctx)
    axes = list(range(axis, len(shape)))
    offsets = list(p.offset) * len(axes) if len(p.offset) == 1 else \
        (list(p.offset) or [0] * len(axes))
    ends = [o + target[a] for o, a in zip(offsets, axes)]
    ctx.node("Slice", [ctx.bottoms[0], ctx.const("starts", offsets, np.int64),
                       ctx.const("ends", ends, np.int64), ctx.const("axes", axes, np.int64)],
             ctx.tops())


@converts("Eltwise")
def _eltwise(ctx: Ctx) -> None:
    p = ctx.param.eltwise_param
    E = caffe_pb2.EltwiseParameter
    inputs = list(ctx.bottoms)
    if p.operation == E.SUM:
        if p.coeff and any(c != 1 for c in p.coeff):
            scaled = []
            for i, (x, c) in enumerate(zip(inputs, p.coeff)):
                if c == 1:
                    scaled.append(x)
                    continue
                out = ctx.temp(f"coeff{i}")
                ctx.node("Mul", [x, ctx.const(f"coeff{i}", np.float32(c))], [out])
                scaled.append(out)
            inputs = scaled
        ctx.node("Sum", inputs, ctx.tops())
    elif p.operation == E.PROD:
        x = inputs[0]
        for i, y in enumerate(inputs[1:], 1):
            out = ctx.tops()[0] if i == len(inputs) - 1 else ctx.temp(f"prod{i}")
            ctx.node("Mul", [x, y], [out])
            x = out
    else:
        ctx.node("Max", inputs, ctx.tops())


@converts("Flatten", "Reshape")
def _reshape(ctx: Ctx) -> None:
    ctx.node("Reshape", [ctx.bottoms[0], ctx.shape_const(ctx.top_shapes[0])], ctx.tops())


@converts("BatchNorm")
def _batch_norm(ctx: Ctx) -> None:
    p = ctx.param.batch_norm_param
    use_global = p.use_global_stats if p.HasField("use_global_stats") else \
        ctx.layer.phase == caffe_pb2.TEST
    if not use_global:
        raise ctx.fail("BatchNorm with batch statistics (use_global_stats false) has no fixed "
                       "ONNX equivalent; export a TEST-phase / deploy net")
    factor = ctx.blobs[2].reshape(-1)[0]
    scale = np.float32(0 if factor == 0 else 1 / factor)
    mean, var = ctx.blobs[0] * scale, ctx.blobs[1] * scale
    channels = ctx.bottom_shapes[0][1]
    ctx.node("BatchNormalization",
             [ctx.bottoms[0], ctx.const("gamma", np.ones(channels)),
              ctx.const("beta", np.zeros(channels)), ctx.const("mean", mean),
              ctx.const("var", var)], ctx.tops(), epsilon=p.eps)


def _operand(ctx: Ctx, field: str, learned_index: int, suffix: str) -> str:
    """The Scale/Bias operand shaped to broadcast against bottom 0 from the param's axis."""
    p = getattr(ctx.param, field)
    ndim = len(ctx.bottom_shapes[0])
    if len(ctx.bottoms) > 1:
        operand_shape = ctx.bottom_shapes[1]
        axis = _canonical(p.axis, ndim, ctx)
        target = operand_shape + (1,) * (ndim - axis - len(operand_shape))
        out = ctx.temp(suffix)
        ctx.node("Reshape", [ctx.bottoms[1], ctx.shape_const(target)], [out])
        return out
    blob = ctx.blobs[learned_index]
    axis = _canonical(p.axis, ndim, ctx) if blob.ndim else 0
    return ctx.const(suffix, _broadcast(blob, axis, ndim) if blob.ndim else blob)


@converts("Scale")
def _scale(ctx: Ctx) -> None:
    p = ctx.param.scale_param
    gamma = _operand(ctx, "scale_param", 0, "scale")
    if not p.bias_term:
        ctx.node("Mul", [ctx.bottoms[0], gamma], ctx.tops())
        return
    scaled = ctx.temp("scaled")
    ctx.node("Mul", [ctx.bottoms[0], gamma], [scaled])
    bias_index = 1 if len(ctx.bottoms) == 1 else 0
    ndim = len(ctx.bottom_shapes[0])
    axis = _canonical(p.axis, ndim, ctx)
    bias = ctx.blobs[bias_index]
    ctx.node("Add", [scaled, ctx.const("bias", _broadcast(bias, axis, ndim))], ctx.tops())


@converts("Bias")
def _bias(ctx: Ctx) -> None:
    ctx.node("Add", [ctx.bottoms[0], _operand(ctx, "bias_param", 0, "bias")], ctx.tops())


@converts("LRN")
def _lrn(ctx: Ctx) -> None:
    p = ctx.param.lrn_param
    L = caffe_pb2.LRNParameter
    if p.norm_region == L.ACROSS_CHANNELS:
        ctx.node("LRN", ctx.bottoms, ctx.tops(), size=p.local_size, alpha=p.alpha, beta=p.beta,
                 bias=p.k)
        return
    x, half = ctx.bottoms[0], (p.local_size - 1) // 2
    square, mean, scale = ctx.temp("square"), ctx.temp("mean"), ctx.temp("scale")
    ctx.node("Mul", [x, x], [square])
    ctx.node("AveragePool", [square], [mean], kernel_shape=[p.local_size] * 2,
             pads=[half] * 4, strides=[1, 1], count_include_pad=1)
    affine = _affine(ctx, mean, p.alpha, 1.0)
    ctx.node("Pow", [affine, ctx.const("beta", np.float32(-p.beta))], [scale])
    ctx.node("Mul", [x, scale], ctx.tops())


# -- the model ------------------------------------------------------------------------------------
def to_onnx(net):
    """The ``onnx.ModelProto`` of a built net (its current weights as initializers)."""
    graph = Graph(net)
    onnx = graph.onnx
    helper, TensorProto = onnx.helper, onnx.TensorProto
    inputs = []
    for name in net.inputs:
        graph.current[name] = graph.fresh(name)
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                    list(net.blobs[name].shape)))
    for index, layer in enumerate(net.layers):
        if layer.is_input:
            continue
        convert = CONVERTERS.get(layer.type)
        if convert is None:
            raise LayerError(f"cannot export to ONNX: {layer.type} has no exact ONNX "
                             f"equivalent here (exported types: {', '.join(sorted(CONVERTERS))})",
                             layer=layer.name, layer_type=layer.type)
        convert(Ctx(graph, index))
    outputs = []
    for name in net.outputs:
        tensor = graph.tensor(name)
        outputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT,
                                                     list(net.blobs[name].shape)))
    model = helper.make_model(
        helper.make_graph(graph.nodes, net.name or "net", inputs, outputs, graph.initializers),
        producer_name="netengine", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def output_names(model) -> list[str]:
    return [o.name for o in model.graph.output]


def export(net, path) -> object:
    """Write ``net`` as an ONNX file (atomically); returns the model."""
    model = to_onnx(net)
    write_atomic(path, model.SerializeToString())
    return model


def verify(net, model, seed: int = 0) -> float:
    """Run the model in onnxruntime and the net on the same random inputs; the largest
    difference of any output relative to that output's largest magnitude."""
    try:
        import onnxruntime
    except ImportError:
        raise NetEngineError("verifying needs onnxruntime, which is not installed "
                             "(pip install onnxruntime)") from None
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(net.blobs[name].shape).astype(np.float32)
             for name in net.inputs}
    ours = net.forward(**feeds)
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    theirs = session.run(None, feeds)
    worst = 0.0
    for name, value in zip(net.outputs, theirs):
        expected = backend.to_host(ours[name]).astype(np.float64)
        scale = max(float(np.abs(expected).max(initial=0.0)), 1e-12)
        worst = max(worst, float(np.abs(expected - value).max(initial=0.0)) / scale)
    return worst
