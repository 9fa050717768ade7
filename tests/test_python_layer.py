"""Python layers: pycaffe's interface, module lookup (sys.path only; never the prototxt's folder),
learned blobs, losses, stand-ins for Python data layers, one-line errors."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import ACCEPTANCE

from netengine.errors import LayerError, NetEngineError
from netengine.layers import python_layer
from netengine.net import Net
from netengine.proto import caffe_pb2
from netengine.testing import check_gradient, make_blobs, make_layer, setup_layer

SCALE_MODULE = '''
import numpy as np
from netengine.layers.python_layer import PythonLayerBase

CALLS = []


class ScaleLayer(PythonLayerBase):
    """top = k * w * bottom, k from param_str, w a learned scalar blob (initialised to 1)."""

    def setup(self, bottom, top):
        CALLS.append(("setup", self.phase, self.param_str))
        if len(bottom) != 1:
            raise Exception("ScaleLayer needs one bottom")
        self.k = float(self.param_str or 1)
        self.blobs.add_blob(1)
        self.blobs[0].data[...] = 1.0

    def reshape(self, bottom, top):
        CALLS.append(("reshape", bottom[0].shape))
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        CALLS.append(("forward", type(bottom[0].data), type(self.blobs[0].data)))
        top[0].data[...] = self.k * self.blobs[0].data * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.k * self.blobs[0].data * top[0].diff
        self.blobs[0].diff[...] += self.k * np.sum(top[0].diff * bottom[0].data)


class Plain:
    """Duck-typed: no base class, no __init__ argument."""

    def setup(self, bottom, top):
        self.legacy = (bottom[0].num, bottom[0].channels, bottom[0].height, bottom[0].width)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].count)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data.reshape(-1) + 1

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


class Broken(PythonLayerBase):
    def forward(self, bottom, top):
        raise ValueError("boom")


class MakeData(PythonLayerBase):
    def setup(self, bottom, top):
        self.shape = eval(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*self.shape)
        top[1].reshape(self.shape[0])

    def forward(self, bottom, top):
        top[0].data[...] = 1.0
        top[1].data[...] = 0
'''

# A Euclidean loss written as pycaffe's examples/pycaffe/layers/pyloss.py does (our own code).
PYLOSS_MODULE = '''
import numpy as np
from netengine.layers.python_layer import PythonLayerBase


class EuclideanLossLayer(PythonLayerBase):
    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("need two bottoms")

    def reshape(self, bottom, top):
        self.diff = np.zeros_like(bottom[0].data)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1), (1, -1)):
            if propagate_down[i]:
                bottom[i].diff[...] = sign * self.diff / bottom[i].num
'''

NET = """name: "py"
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "scale" type: "Python" bottom: "x" top: "y"
        python_param { module: "%s" layer: "ScaleLayer" param_str: "3" } }
"""


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path holding uniquely named layer modules (imports are cached by
    name); as in Caffe, the user puts it there (PYTHONPATH)."""
    name = f"pylayers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SCALE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, name
    sys.modules.pop(name, None)


def write_net(folder, module, text=NET):
    path = folder / "net.prototxt"
    path.write_text(text % module)
    return path


def test_module_only_beside_the_prototxt_is_refused_with_the_pythonpath(tmp_path):
    name = f"beside_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("import sys\nsys.BESIDE_RAN = True\n" + SCALE_MODULE)
    with pytest.raises(LayerError) as err:
        Net(str(write_net(tmp_path, name)), caffe_pb2.TRAIN)
    assert f"PYTHONPATH={tmp_path}" in str(err.value) and "\n" not in str(err.value)
    assert name not in sys.modules and not hasattr(sys, "BESIDE_RAN")  # never imported


@pytest.mark.parametrize("module, layer", [("os", "system"), ("builtins", "print"),
                                           ("os", "sep")])
def test_python_param_layer_must_name_a_layer_class(tmp_path, module, layer):
    path = tmp_path / "net.prototxt"
    path.write_text(NET.replace('"%s" layer: "ScaleLayer"', f'"{module}" layer: "{layer}"'))
    with pytest.raises(LayerError, match="is not a layer class"):
        Net(str(path))


def test_module_on_the_path_forward_backward_and_params(module_dir):
    folder, module = module_dir
    net = Net(str(write_net(folder, module)), caffe_pb2.TRAIN)
    calls = sys.modules[module].CALLS
    assert calls[0] == ("setup", caffe_pb2.TRAIN, "3")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = net.forward(x=x)
    np.testing.assert_allclose(out["y"], 3 * x)
    assert ("reshape", (2, 3)) in calls
    # the added blob is a net parameter with a gradient
    assert list(net.params) == ["scale"] and net.params["scale"][0].shape == (1,)
    assert len(net.learnable_params) == 1
    net.blobs["y"].diff[...] = 1.0
    net.clear_param_diffs()
    net.backward_from_to(len(net.layers) - 1, 0)
    np.testing.assert_allclose(net.params["scale"][0].diff, [3 * x.sum()])
    # reshape runs before every forward: a new input shape flows through
    out = net.forward(x=np.ones((4, 3), np.float32))
    assert out["y"].shape == (4, 3)


def test_phase_is_handed_to_the_layer(module_dir):
    folder, module = module_dir
    Net(str(write_net(folder, module)), caffe_pb2.TEST)
    assert sys.modules[module].CALLS[0][1] == caffe_pb2.TEST


def test_python_layer_blobs_are_saved_and_loaded(module_dir, tmp_path):
    folder, module = module_dir
    path = write_net(folder, module)
    net = Net(str(path))
    net.params["scale"][0].data[...] = 0.25
    weights = tmp_path / "w.caffemodel"
    net.save(str(weights))
    again = Net(str(path), weights=str(weights))
    assert again.params["scale"][0].data[0] == np.float32(0.25)


def test_module_on_sys_path_and_gradient(module_dir, monkeypatch, xp):
    folder, module = module_dir
    monkeypatch.syspath_prepend(str(folder))
    layer = make_layer(f'type: "Python" python_param {{ module: "{module}" '
                       f'layer: "ScaleLayer" param_str: "2.5" }}')
    bottom = make_blobs([(2, 3, 4)], xp=xp)
    top = setup_layer(layer, bottom)
    layer.blobs[0].data[...] = 1.5
    check_gradient(layer, bottom, top)
    layer.forward(bottom, top)
    np.testing.assert_allclose(np.asarray(top[0].data.get() if xp is not np else top[0].data),
                               3.75 * (bottom[0].data.get() if xp is not np else bottom[0].data))


def test_duck_typed_class_and_legacy_blob_members(module_dir, monkeypatch, xp):
    folder, module = module_dir
    monkeypatch.syspath_prepend(str(folder))
    layer = make_layer(f'type: "Python" python_param {{ module: "{module}" layer: "Plain" }}')
    bottom = make_blobs([(2, 3, 4, 5)], xp=xp)
    top = setup_layer(layer, bottom)
    assert layer.impl.legacy == (2, 3, 4, 5)
    assert top[0].shape == (120,)
    check_gradient(layer, bottom, top, elementwise=False)


def test_python_loss_layer_in_bvlcs_linreg_net(tmp_path, monkeypatch):
    path = ACCEPTANCE / "nets/bvlc_caffe/examples/pycaffe/linreg.prototxt"
    if not path.exists():
        pytest.skip("../shared/acceptance is absent")
    with pytest.raises(NetEngineError) as err:
        Net(str(path))
    assert "module 'pyloss' not found" in str(err.value) and "linreg.prototxt:44" in str(err.value)
    (tmp_path / "pyloss.py").write_text(PYLOSS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pyloss", raising=False)
    try:
        net = Net(str(path), caffe_pb2.TRAIN)
        loss = net.forward_backward()
        a, b = net.blobs["ipx"].data, net.blobs["ipy"].data
        expected = np.sum((a.astype(np.float64) - b) ** 2) / a.shape[0] / 2
        assert loss == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(net.blobs["ipx"].diff, (a - b) / a.shape[0], rtol=1e-5)
        np.testing.assert_allclose(net.blobs["ipy"].diff, (b - a) / a.shape[0], rtol=1e-5)
        assert any(np.any(p.diff != 0) for p in net.learnable_params)
    finally:
        sys.modules.pop("pyloss", None)


def test_missing_module_class_and_user_errors_are_one_line(module_dir, tmp_path):
    folder, module = module_dir
    missing = tmp_path / "missing.prototxt"
    missing.write_text(NET % "no_such_module_xyz")
    with pytest.raises(LayerError) as err:
        Net(str(missing))
    text = str(err.value)
    assert "\n" not in text and "missing.prototxt:4" in text and "layer 'scale' (Python)" in text
    assert "'no_such_module_xyz' not found on sys.path" in text
    no_class = tmp_path / "no_class.prototxt"
    no_class.write_text((NET % module).replace("ScaleLayer", "Nope"))
    with pytest.raises(LayerError, match=f"module '{module}' has no class 'Nope'"):
        Net(str(no_class))
    raising = tmp_path / "raising.prototxt"
    raising.write_text((NET % module).replace("ScaleLayer", "Broken"))
    net = Net(str(raising))
    with pytest.raises(LayerError) as err:
        net.forward()
    assert "Broken.forward raised ValueError: boom" in str(err.value)
    assert f"{module}.py:" in str(err.value)  # where in the user's file
    assert isinstance(err.value.user_exception, ValueError)  # with its traceback


def test_module_failing_to_import_and_pycaffe_import_hint(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bad_import_mod.py").write_text("import caffe\n")
    (tmp_path / "bad_code_mod.py").write_text("raise RuntimeError('at import')\n")
    for module, needle in (("bad_import_mod", "import netengine as caffe"),
                           ("bad_code_mod", "RuntimeError: at import")):
        path = tmp_path / f"{module}.prototxt"
        path.write_text(NET % module)
        try:
            with pytest.raises(LayerError) as err:
                Net(str(path))
            assert "failed to import" in str(err.value) and needle in str(err.value)
        finally:
            sys.modules.pop(module, None)


def test_python_data_layer_missing_then_stand_in_and_real(module_dir, tmp_path):
    folder, module = module_dir
    text = ('layer { name: "data" type: "Python" top: "data" top: "label" '
            'python_param { module: "%s" layer: "MakeData" param_str: "(2, 3, 4, 4)" } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 5 } }\n')
    absent = tmp_path / "absent.prototxt"
    absent.write_text(text % "absent_data_module")
    with pytest.raises(LayerError, match="missing data source: Python layer module"):
        Net(str(absent))
    net = Net(str(absent), input_shapes={"data": (3, 3, 4, 4)})
    assert net.blobs["label"].shape == (3,) and net.blobs["ip"].shape == (3, 5)
    assert net.layer_dict["data"].type == "Input"
    real = Net(str(write_net(folder, module, text)))
    out = real.forward()
    assert out["ip"].shape == (2, 5) and real.blobs["label"].shape == (2,)


def test_python_param_needs_module_and_layer():
    with pytest.raises(LayerError, match="needs both 'module' and 'layer'"):
        setup_layer(make_layer('type: "Python" python_param { module: "x" }'),
                    make_blobs([(1,)]))


def test_docs_say_it_runs_user_code():
    doc = python_layer.__doc__
    assert "runs the user's code, by design" in doc
    assert "Nothing" in doc and "else in netengine ever executes code" in doc


def test_gpu_mode_hands_host_arrays_to_the_user(module_dir, monkeypatch):
    """On the GPU path (fake_cupy: CuPy's rules on NumPy) the user's code sees NumPy arrays;
    results, shapes and gradients are copied back to the device."""
    import fake_cupy

    from netengine import backend

    fcp = fake_cupy.cupy
    folder, module = module_dir
    monkeypatch.setattr(backend, "_import_cupy", lambda: fcp)
    backend.set_mode_gpu()
    try:
        net = Net(str(write_net(folder, module)), caffe_pb2.TRAIN)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        out = net.forward(x=fcp.asarray(x))
        assert isinstance(out["y"], fcp.ndarray)
        np.testing.assert_allclose(out["y"].get(), 3 * x)
        forward_call = [c for c in sys.modules[module].CALLS if c[0] == "forward"][-1]
        assert forward_call[1:] == (np.ndarray, np.ndarray)
        weight = net.params["scale"][0]
        assert isinstance(weight.data, fcp.ndarray)  # add_blob's blob lives on the device
        net.blobs["y"].diff[...] = 1.0
        net.clear_param_diffs()
        net.backward_from_to(len(net.layers) - 1, 0)
        np.testing.assert_allclose(weight.diff.get(), [3 * x.sum()])
        np.testing.assert_allclose(net.blobs["x"].diff.get(), np.full((2, 3), 3.0))
        out = net.forward(x=fcp.ones((4, 3), dtype=np.float32))  # reshape copied back
        assert out["y"].shape == (4, 3)
    finally:
        backend.set_mode_cpu()
