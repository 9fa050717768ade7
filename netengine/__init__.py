"""netengine: a Caffe-compatible deep-learning engine on NumPy (CPU) and CuPy (GPU).

pycaffe-shaped: ``import netengine as caffe`` then ``caffe.Net(prototxt, caffe.TEST,
weights=...)``, ``net.blobs['data'].data[...] = x``, ``net.forward()``.

As pycaffe, it logs Caffe's glog lines on stderr; ``GLOG_minloglevel=1`` (or
``netengine.set_log_level(1)``) keeps warnings and errors only, ``2`` errors only.
"""
from __future__ import annotations

import importlib

from netengine.backend import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from netengine.errors import NetEngineError
from netengine.layers import layer_type_list
from netengine.logging_glog import install_default, set_log_level
from netengine.net import TEST, TRAIN, Net

__version__ = "0.1.0"

install_default()

__all__ = ["Net", "NetEngineError", "TEST", "TRAIN", "layer_type_list", "set_device",
           "set_log_level", "set_mode_cpu", "set_mode_gpu", "set_random_seed", "__version__"]


def __getattr__(name: str):
    # Solvers live in their own module; import them lazily so the core stays light.
    solver_names = {"get_solver", "SGDSolver", "NesterovSolver", "AdaGradSolver",
                    "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "Solver"}
    if name in solver_names:
        from netengine import solvers

        return getattr(solvers, name)
    if name in ("NetSpec", "params", "to_proto"):  # pycaffe's net_spec names
        from netengine import net_spec

        return getattr(net_spec, name)
    if name == "io":  # pycaffe's caffe.io (Transformer, load_image, proto conversions)
        return importlib.import_module("netengine.io")
    if name == "Classifier":
        from netengine.classifier import Classifier

        return Classifier
    if name == "Layer":  # pycaffe's Python-layer base class
        from netengine.layers.python_layer import PythonLayerBase

        return PythonLayerBase
    raise AttributeError(f"module 'netengine' has no attribute '{name}'")
