"""NumPy-vs-device agreement runs shared by tests/test_gpu.py (real CuPy) and
tests/test_backend.py (the fake CuPy of tests/fake_cupy.py).

- ``golden_cases()`` / ``run_golden_case(case, device)``: every Caffe golden case net
  (../shared/caffe-golden/cases) run in CPU mode or GPU mode on the golden inputs: tops,
  bottom diffs, param diffs and params after forward, as host arrays.
- ``SNIPPETS`` / ``run_snippet(snippet, device)``: single layers for the registered types the
  golden cases do not cover (and code paths they miss), run the same way.
- ``assert_agree(ref, got)``: max abs error <= 1e-4 * max |ref| per array.

``device`` False runs in CPU mode (NumPy), True in GPU mode (whatever ``backend`` imports as
CuPy: the real one, or the fake that tests monkeypatch in).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from conftest import GOLDEN

import netengine
from netengine import backend, testing
from netengine.layers import REGISTRY, layer_type_list

RANDOM_CASES = {"dropout_train"}  # drawn by a random stream: NumPy and CuPy draw differently
TOLERANCE = 1e-4


def golden_cases() -> list[dict]:
    index = GOLDEN / "index.json"
    if not index.exists():
        return []
    return [c for c in json.loads(index.read_text())["cases"] if c["name"] not in RANDOM_CASES]


def missing_types(types) -> list[str]:
    layer_type_list()
    return [t for t in types if t not in REGISTRY]


class _Mode:
    """Build and run in GPU mode (device=True) or CPU mode; always back to CPU mode after."""

    def __init__(self, device: bool) -> None:
        self.device = device

    def __enter__(self):
        if self.device:
            backend.set_mode_gpu()
        else:
            backend.set_mode_cpu()
        return backend.xp()

    def __exit__(self, *exc) -> None:
        backend.set_mode_cpu()


def run_golden_case(case: dict, device: bool) -> dict[str, np.ndarray]:
    """The golden case's net on the golden inputs: {npz-style key: host array}."""
    ref = np.load(GOLDEN / f"{case['name']}.npz", allow_pickle=False)
    phase = netengine.TRAIN if case["phase"] == "TRAIN" else netengine.TEST
    out: dict[str, np.ndarray] = {}
    with _Mode(device) as xp:
        net = netengine.Net(str(GOLDEN / f"{case['name']}.prototxt"), phase)
        for key in ref.files:
            kind, _, rest = key.partition("/")
            if kind == "bottom":
                net.blobs[rest].data[...] = xp.asarray(ref[key])
            elif kind == "param":
                layer, _, i = rest.rpartition("/")
                blob = net.params[layer][int(i)]
                blob.data[...] = xp.asarray(ref[key]).reshape(blob.shape)
        net.forward()
        for key in ref.files:
            kind, _, rest = key.partition("/")
            if kind == "top":
                out[key] = net.blobs[rest].host_data()
            elif kind == "param_after_forward":
                layer, _, i = rest.rpartition("/")
                out[key] = net.params[layer][int(i)].host_data()
        if not case["backward"]:
            return out
        for key in ref.files:
            kind, _, rest = key.partition("/")
            if kind == "top_diff":
                net.blobs[rest].diff[...] = xp.asarray(ref[key])
        net.clear_param_diffs()
        for layer in net.layers:
            for blob in layer.blobs:
                blob.diff[...] = 0
        net.backward()
        for key in ref.files:
            kind, _, rest = key.partition("/")
            if kind == "bottom_diff":
                out[key] = net.blobs[rest].host_diff()
            elif kind == "param_diff":
                layer, _, i = rest.rpartition("/")
                out[key] = net.params[layer][int(i)].host_diff()
    return out


# -- single-layer snippets ---------------------------------------------------------------------
@dataclass
class Snippet:
    """One layer: prototxt body, bottoms as (shape, kind), tops, which bottoms get gradients.

    Bottom kinds: "normal" N(0,1); "positive" in [0.5, 1.5); "prob" rows summing to 1 over
    axis 1; "labels:K" integers in [0, K); "binary" 0/1 (at least one 1); "index:K" integers
    in [0, K).
    """

    name: str
    text: str
    bottoms: list = field(default_factory=list)
    tops: int = 1
    grad: tuple = (0,)  # bottoms that get a gradient
    backward: bool = True
    phase: int = netengine.TRAIN


SNIPPETS = [
    Snippet("batch_reindex", 'type: "BatchReindex"', [((4, 3, 2), "normal"), ((5,), "index:4")]),
    Snippet("contrastive", 'type: "ContrastiveLoss" contrastive_loss_param { margin: 1.5 }',
            [((6, 4), "normal"), ((6, 4), "normal"), ((6,), "binary")], grad=(0, 1)),
    Snippet("contrastive_legacy", 'type: "ContrastiveLoss" contrastive_loss_param '
            '{ legacy_version: true }',
            [((6, 4), "normal"), ((6, 4), "normal"), ((6,), "binary")], grad=(0, 1)),
    Snippet("crop", 'type: "Crop" crop_param { axis: 2 offset: 1 offset: 2 }',
            [((2, 3, 6, 7), "normal"), ((2, 3, 4, 4), "normal")]),
    Snippet("embed", 'type: "Embed" embed_param { num_output: 3 input_dim: 5 '
            'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" } }',
            [((7,), "index:5")], grad=()),
    Snippet("filter", 'type: "Filter"', [((5, 3), "normal"), ((5,), "binary")]),
    Snippet("lstm_unit", 'type: "LSTMUnit"',
            [((1, 3, 2), "normal"), ((1, 3, 8), "normal"), ((1, 3), "binary")], tops=2,
            grad=(0, 1)),
    Snippet("lstm_static", 'type: "LSTM" recurrent_param { num_output: 3 '
            'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } }',
            [((4, 2, 5), "normal"), ((4, 2), "binary"), ((2, 3), "normal")], grad=(0, 2)),
    Snippet("rnn_exposed", 'type: "RNN" recurrent_param { num_output: 3 expose_hidden: true '
            'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } }',
            [((4, 2, 5), "normal"), ((4, 2), "binary"), ((1, 2, 3), "normal")], tops=2,
            grad=(0, 2)),
    Snippet("hinge_l1", 'type: "HingeLoss"', [((5, 4), "normal"), ((5,), "labels:4")]),
    Snippet("hinge_l2", 'type: "HingeLoss" hinge_loss_param { norm: L2 }',
            [((5, 4), "normal"), ((5,), "labels:4")]),
    Snippet("im2col", 'type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 }',
            [((2, 3, 5, 6), "normal")]),
    Snippet("infogain", 'type: "InfogainLoss"',
            [((5, 4), "normal"), ((5,), "labels:4"), ((4, 4), "positive")]),
    Snippet("log", 'type: "Log" log_param { base: 2 scale: 0.5 shift: 1 }',
            [((3, 4), "positive")]),
    Snippet("multinomial_logistic", 'type: "MultinomialLogisticLoss"',
            [((5, 4), "prob"), ((5,), "labels:4")]),
    Snippet("parameter", 'type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', [],
            grad=()),
    Snippet("spp_max", 'type: "SPP" spp_param { pyramid_height: 3 }', [((2, 3, 8, 9), "normal")]),
    Snippet("spp_ave", 'type: "SPP" spp_param { pyramid_height: 2 pool: AVE }',
            [((2, 2, 7, 7), "normal")]),
    Snippet("silence", 'type: "Silence"', [((3, 4), "normal")], tops=0),
    Snippet("threshold", 'type: "Threshold" threshold_param { threshold: 0.2 }',
            [((3, 5), "normal")], backward=False),
    Snippet("tile", 'type: "Tile" tile_param { axis: 1 tiles: 3 }', [((2, 3, 2), "normal")]),
    Snippet("dummy_data", 'type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } '
            'data_filler { type: "constant" value: 0.5 } }', [], grad=(), backward=False),
    # code paths the golden cases miss
    Snippet("pool_stochastic_test", 'type: "Pooling" pooling_param { pool: STOCHASTIC '
            'kernel_size: 3 stride: 2 }', [((2, 2, 7, 7), "positive")], backward=False,
            phase=netengine.TEST),
    Snippet("pool_max_mask", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 '
            'pad: 1 }', [((2, 2, 6, 6), "normal")], tops=2),
    Snippet("pool_ave_pad", 'type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 '
            'pad: 1 }', [((2, 2, 6, 7), "normal")]),
    Snippet("conv_dilated", 'type: "Convolution" convolution_param { num_output: 4 '
            'kernel_size: 3 dilation: 2 pad: 2 weight_filler { type: "gaussian" } '
            'bias_filler { type: "gaussian" } }', [((2, 3, 7, 7), "normal")]),
    Snippet("conv_1x1_group", 'type: "Convolution" convolution_param { num_output: 4 '
            'kernel_size: 1 group: 2 weight_filler { type: "gaussian" } '
            'bias_filler { type: "gaussian" } }', [((2, 4, 3, 5), "normal")]),
    Snippet("conv_3d", 'type: "Convolution" convolution_param { num_output: 2 kernel_size: 2 '
            'weight_filler { type: "gaussian" } }', [((2, 2, 3, 4, 4), "normal")]),
    Snippet("deconv_group", 'type: "Deconvolution" convolution_param { num_output: 4 '
            'kernel_size: 3 stride: 2 group: 2 weight_filler { type: "gaussian" } '
            'bias_filler { type: "gaussian" } }', [((2, 2, 3, 3), "normal")]),
    Snippet("lrn_within", 'type: "LRN" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL '
            'alpha: 0.5 }', [((2, 3, 5, 5), "normal")]),
    Snippet("softmax_axis2", 'type: "Softmax" softmax_param { axis: 2 }',
            [((2, 3, 4), "normal")]),
    Snippet("softmax_loss_ignore", 'type: "SoftmaxWithLoss" loss_param { ignore_label: 1 '
            'normalization: VALID }', [((6, 4), "normal"), ((6,), "labels:4")]),
    Snippet("accuracy_ignore", 'type: "Accuracy" accuracy_param { top_k: 2 ignore_label: 0 }',
            [((6, 4), "normal"), ((6,), "labels:4")], tops=2, grad=(), backward=False),
    Snippet("argmax_topk", 'type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }',
            [((3, 5), "normal")], grad=(), backward=False),
    Snippet("reduction_asum", 'type: "Reduction" reduction_param { operation: ASUM axis: 1 }',
            [((3, 4, 2), "normal")]),
    Snippet("reduction_mean", 'type: "Reduction" reduction_param { operation: MEAN coeff: 2 }',
            [((3, 4), "normal")]),
    Snippet("mvn_across", 'type: "MVN" mvn_param { across_channels: true }',
            [((2, 3, 4, 4), "normal")]),
    Snippet("batchnorm_test", 'type: "BatchNorm" batch_norm_param { use_global_stats: true }',
            [((2, 3, 4), "normal")], grad=()),
    Snippet("scale_two_bottoms", 'type: "Scale" scale_param { axis: 1 bias_term: true }',
            [((2, 3, 4), "normal"), ((3,), "normal")], grad=(0, 1)),
    Snippet("bias_two_bottoms", 'type: "Bias"', [((2, 3, 4), "normal"), ((3, 4), "normal")],
            grad=(0, 1)),
    Snippet("prelu_shared", 'type: "PReLU" prelu_param { channel_shared: true '
            'filler { type: "constant" value: 0.3 } }', [((2, 3, 4), "normal")]),
    Snippet("eltwise_prod_unstable", 'type: "Eltwise" eltwise_param { operation: PROD '
            'stable_prod_grad: false }', [((2, 3), "positive"), ((2, 3), "positive")],
            grad=(0, 1)),
    Snippet("power", 'type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }',
            [((3, 4), "positive")]),
    Snippet("exp_base", 'type: "Exp" exp_param { base: 3 scale: 0.5 shift: 0.1 }',
            [((3, 4), "normal")]),
    Snippet("sigmoid_ce", 'type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 }',
            [((4, 3), "normal"), ((4, 3), "binary")]),
    Snippet("euclidean_both", 'type: "EuclideanLoss"', [((4, 3), "normal"), ((4, 3), "normal")],
            grad=(0, 1)),
]


def _bottom_value(shape, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.normal(size=shape)
    if kind == "positive":
        return rng.uniform(0.5, 1.5, size=shape)
    if kind == "prob":
        raw = rng.uniform(0.1, 1.0, size=shape)
        return raw / raw.sum(axis=1, keepdims=True)
    if kind == "binary":
        values = (rng.random(shape) > 0.5).astype(np.float64)
        values.reshape(-1)[0] = 1.0
        return values
    name, _, k = kind.partition(":")
    if name in ("labels", "index"):
        return rng.integers(0, int(k), size=shape).astype(np.float64)
    raise ValueError(f"unknown bottom kind {kind}")


def run_snippet(snippet: Snippet, device: bool, dtype=np.float32) -> dict[str, np.ndarray]:
    """The layer's tops, bottom diffs and param diffs (host arrays) after forward/backward."""
    rng = np.random.default_rng(20240601)
    host_bottoms = [_bottom_value(shape, kind, rng).astype(dtype)
                    for shape, kind in snippet.bottoms]
    out: dict[str, np.ndarray] = {}
    with _Mode(device) as xp:
        backend.set_random_seed(1701)
        layer = testing.make_layer(snippet.text, phase=snippet.phase)
        bottoms = []
        for value in host_bottoms:
            blob = netengine.blob.Blob(value.shape, dtype=dtype, xp=xp)
            blob.data[...] = xp.asarray(value)
            bottoms.append(blob)
        tops = [netengine.blob.Blob((), dtype=dtype, xp=xp) for _ in range(snippet.tops)]
        if not bottoms:
            layer.dtype = np.dtype(dtype)
        layer.setup(bottoms, tops)
        if snippet.name == "batchnorm_test":  # global statistics to use
            layer.blobs[0].data[...] = xp.asarray(rng.normal(size=layer.blobs[0].shape)
                                                  .astype(dtype))
            layer.blobs[1].data[...] = xp.asarray(rng.uniform(0.5, 2, layer.blobs[1].shape)
                                                  .astype(dtype))
            layer.blobs[2].data[...] = 2.0
        layer.forward(bottoms, tops)
        for j, top in enumerate(tops):
            out[f"top/{j}"] = top.host_data()
        if not snippet.backward:
            return out
        for top in tops:
            if not (layer.loss_weights and any(layer.loss_weights)):
                top.diff[...] = xp.asarray(rng.normal(size=top.shape).astype(dtype))
        for blob in layer.blobs:
            blob.diff[...] = 0
        propagate = [i in snippet.grad for i in range(len(bottoms))]
        layer.backward(tops, propagate, bottoms)
        for i in snippet.grad:
            out[f"bottom_diff/{i}"] = bottoms[i].host_diff()
        for j, blob in enumerate(layer.blobs):
            if j < len(layer.param_propagate_down) and layer.param_propagate_down[j]:
                out[f"param_diff/{j}"] = blob.host_diff()
    return out


def assert_agree(ref: dict, got: dict, what: str, tolerance: float = TOLERANCE) -> None:
    assert sorted(ref) == sorted(got), f"{what}: outputs differ: {sorted(ref)} vs {sorted(got)}"
    for key in ref:
        a = np.asarray(ref[key], dtype=np.float64)
        b = np.asarray(got[key], dtype=np.float64)
        assert a.shape == b.shape, f"{what} {key}: shape {b.shape} vs {a.shape}"
        if not a.size:
            continue
        err = float(np.max(np.abs(a - b)))
        bound = tolerance * max(float(np.max(np.abs(a))), 1e-6)
        assert err <= bound, f"{what} {key}: max abs error {err:.3g} > {bound:.3g}"
