"""Python layer: a layer implemented by the user's own Python class (pycaffe's ``"Python"``).

    layer { name: "data" type: "Python" top: "data" top: "label"
            python_param { module: "my_layers" layer: "MyDataLayer" param_str: "{'k': 3}" } }

**This layer runs the user's code, by design.** Building a net that holds a Python layer
imports ``python_param.module`` (from ``sys.path`` only, as Caffe does: a module beside the
prototxt is refused with the ``PYTHONPATH`` to use) and instantiates the class named by
``python_param.layer`` (a class, never any other callable): whatever that module does at
import or in its methods happens with your privileges. Only build nets whose Python modules you
trust. Nothing else in netengine ever executes code named by a model file; a net without
Python layers runs no user code.

The class follows pycaffe's interface (subclass :class:`PythonLayerBase`, pycaffe's
``caffe.Layer``, or write the same methods on any class):

* ``__init__(layer_param)`` (pycaffe passes the LayerParameter); then, as in Caffe, the
  attributes ``param_str`` (``python_param.param_str``) and ``phase`` (0 = TRAIN, 1 = TEST) are
  set before ``setup(bottom, top)`` is called once;
* ``reshape(bottom, top)`` before every forward; ``forward(bottom, top)``;
  ``backward(top, propagate_down, bottom)`` (``propagate_down``: one bool per bottom);
* ``bottom``/``top`` are lists of blobs with pycaffe's members: ``data`` and ``diff`` (NumPy
  arrays in the blob's shape, written in place: ``top[0].data[...] = x``), ``reshape(*shape)``,
  ``shape``, ``count``, ``num``/``channels``/``height``/``width``;
* ``self.blobs``: the layer's learned blobs; ``self.blobs.add_blob(*shape)`` adds one (it is
  then a net parameter: solvers update it, ``copy_from``/``save`` load and store it);
* a non-zero ``loss_weight`` on a top makes the layer a loss, as in Caffe.

With the GPU backend the arrays handed to the user are host copies (as pycaffe's ``.data``
is), copied back to the device after each call.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import traceback

import numpy as np

from netengine import backend
from netengine.blob import Blob
from netengine.errors import DataSourceError
from netengine.layers.base import Layer, register

_IMPORT_LOCK = threading.Lock()


class PythonLayerBase:
    """pycaffe's ``caffe.Layer``: the base a Python layer may derive from (all methods no-ops)."""

    def __init__(self, layer_param=None) -> None:
        self.layer_param = layer_param

    def setup(self, bottom, top) -> None:
        """Once, before the first reshape: read ``self.param_str``, check bottoms/tops."""

    def reshape(self, bottom, top) -> None:
        """Before every forward: shape the tops (``top[i].reshape(*shape)``)."""

    def forward(self, bottom, top) -> None:
        """Compute ``top[i].data`` from ``bottom[i].data``."""

    def backward(self, top, propagate_down, bottom) -> None:
        """Write ``bottom[i].diff`` where ``propagate_down[i]``; accumulate param diffs."""


class PyBlob:
    """A pycaffe-shaped view of a netengine Blob (``data``, ``diff``, ``reshape(*shape)``)."""

    __slots__ = ("_blob",)

    def __init__(self, blob: Blob) -> None:
        self._blob = blob

    @property
    def blob(self) -> Blob:
        """The netengine Blob behind this view."""
        return self._blob

    @property
    def data(self):
        return self._blob.data

    @data.setter
    def data(self, value) -> None:
        self._blob.data[...] = value

    @property
    def diff(self):
        return self._blob.diff

    @diff.setter
    def diff(self, value) -> None:
        self._blob.diff[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return self._blob.shape

    @property
    def count(self) -> int:
        return self._blob.count

    num = property(lambda self: self._blob.num)
    channels = property(lambda self: self._blob.channels)
    height = property(lambda self: self._blob.height)
    width = property(lambda self: self._blob.width)

    def reshape(self, *shape) -> None:
        self._blob.reshape(*shape)

    def __repr__(self) -> str:
        return f"<Blob {self._blob.shape}>"


class BlobVec(list):
    """pycaffe's ``layer.blobs``: a list of blobs with ``add_blob(*shape)``."""

    def __init__(self, owner: Python) -> None:
        super().__init__()
        self._owner = owner

    def add_blob(self, *shape) -> PyBlob:
        """Append a new learned blob of ``shape`` (zeros) and return it."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        owner = self._owner
        xp = np if owner.in_host_call else owner.xp
        blob = Blob(tuple(int(d) for d in shape), dtype=owner.dtype, xp=xp)
        owner.blobs.append(blob)
        owner.param_propagate_down.append(True)
        view = PyBlob(blob)
        self.append(view)
        return view


def _folder_of(source_file) -> str | None:
    if not source_file:
        return None
    return os.path.dirname(os.path.abspath(os.fspath(source_file)))


def import_layer_module(module: str, folder: str | None = None):
    """Import ``module`` from ``sys.path`` only (Caffe's rule); None where it is absent.

    ``folder`` (the prototxt's) is never imported from: a module that merely sits beside a
    downloaded prototxt would run with the user's privileges. When the module is found only
    there, :class:`BesideOnly` says so, so the error can give the exact ``PYTHONPATH``.
    Errors raised by the module's own code propagate (they are the user's).
    """
    with _IMPORT_LOCK:
        if module in sys.modules:
            return sys.modules[module]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return importlib.import_module(module)
        if folder and os.path.isdir(folder) and _finds(module, folder):
            raise BesideOnly(folder)
        return None


class BesideOnly(Exception):
    """The layer module exists only in the prototxt's folder, which is not on sys.path."""

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.folder = folder


def _finds(module: str, folder: str) -> bool:
    """Whether ``module``'s top-level package or file is in ``folder`` (nothing is run)."""
    try:
        return importlib.machinery.PathFinder.find_spec(module.split(".")[0], [folder]) \
            is not None
    except (ImportError, ValueError):
        return False


_METHODS = ("setup", "reshape", "forward", "backward")


def _is_layer_class(cls) -> bool:
    """A class deriving from caffe.Layer, or one with the four methods of the interface."""
    if not isinstance(cls, type):
        return False
    return issubclass(cls, PythonLayerBase) or all(
        callable(getattr(cls, name, None)) for name in _METHODS)


@register
class Python(Layer):
    """Runs ``python_param.module``.``python_param.layer`` (see the module docstring).

    Caffe's quirks kept: ``param_str`` and ``phase`` are set after construction and before
    ``setup``; ``reshape`` runs before every forward; a missing module is an error at net
    construction (here a one-line error naming the module and where it was looked for).
    """

    type = "Python"

    def __init__(self, layer_param) -> None:
        super().__init__(layer_param)
        self.impl = None
        self.in_host_call = False
        self.py_blobs = BlobVec(self)

    def __getattr__(self, name: str):
        # pycaffe's net.layers[i] of a Python layer IS the user's object: reach its own
        # attributes and methods through this wrapper (only names the wrapper lacks get here).
        impl = self.__dict__.get("impl")
        if impl is None or name.startswith("__"):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(impl, name)

    # -- construction --------------------------------------------------------------------------
    def _load_class(self):
        spec = self.layer_param.python_param
        if not spec.module or not spec.layer:
            raise self.fail("python_param needs both 'module' and 'layer' (the class name)")
        folder = _folder_of(getattr(self, "source_file", None))
        try:
            module = import_layer_module(spec.module, folder)
        except BesideOnly as err:
            raise self.fail(f"Python layer module '{spec.module}' is not on sys.path; it sits "
                            f"beside the prototxt, which is not imported from (it would run "
                            f"code that came with the net): if you trust it, run with "
                            f"PYTHONPATH={err.folder}") from None
        except ModuleNotFoundError as err:
            hint = ""
            if err.name == "caffe":
                hint = (" (it imports pycaffe's 'caffe': write 'import netengine as caffe' "
                        "instead; caffe.Layer is then netengine's Python-layer base)")
            raise self.fail(f"Python layer module '{spec.module}' failed to import: "
                            f"{err}{hint}") from err
        except Exception as err:
            raise self.fail(f"Python layer module '{spec.module}' failed to import: "
                            f"{type(err).__name__}: {err}") from err
        if module is None:
            if not self.layer_param.bottom:  # a Python data layer
                raise self.fail(f"missing data source: Python layer module '{spec.module}' not "
                                "found on sys.path; put its folder on PYTHONPATH",
                                DataSourceError)
            raise self.fail(f"Python layer module '{spec.module}' not found on sys.path; put "
                            "its folder on PYTHONPATH")
        cls = getattr(module, spec.layer, None)
        if cls is None:
            raise self.fail(f"Python layer module '{spec.module}' has no class '{spec.layer}'")
        if not _is_layer_class(cls):
            # Checked before anything is called: python_param must not name any callable
            # (module: "os" layer: "system" would run a shell command).
            raise self.fail(f"python_param.layer '{spec.module}.{spec.layer}' is not a layer "
                            f"class: expected a subclass of caffe.Layer (netengine.Layer) or a "
                            f"class with {', '.join(_METHODS)}")
        return cls

    def _instantiate(self, cls):
        try:
            if isinstance(cls, type) and cls.__init__ is object.__init__:
                impl = cls()
            else:
                impl = cls(self.layer_param)
        except Exception as err:
            raise self.fail(f"creating {cls.__name__}: {type(err).__name__}: {err}") from err
        impl.param_str = self.layer_param.python_param.param_str
        impl.phase = int(self.phase)
        impl.blobs = self.py_blobs
        if not hasattr(impl, "layer_param"):
            impl.layer_param = self.layer_param
        return impl

    def layer_setup(self, bottom, top) -> None:
        if self.impl is None:
            self.impl = self._instantiate(self._load_class())
        self._call("setup", bottom, top)

    # -- calls into the user's object ------------------------------------------------------------
    def _call(self, name: str, first, second, propagate_down=None) -> None:
        method = getattr(self.impl, name, None)
        if method is None:
            if name in ("setup", "reshape"):
                return
            raise self.fail(f"the Python class has no method '{name}'")
        groups = (first, second)
        blobs = [b for group in groups for b in group] + list(self.blobs)
        on_host = all(b.xp is np for b in blobs)
        mirrors: dict[int, Blob] = {}
        if not on_host:
            for blob in blobs:
                if id(blob) not in mirrors:
                    host = Blob(blob.shape, dtype=blob.dtype, xp=np)
                    host.data[...] = backend.to_host(blob.data)
                    host.diff[...] = backend.to_host(blob.diff)
                    mirrors[id(blob)] = host
            for view, blob in zip(self.py_blobs, self.blobs):
                view._blob = mirrors[id(blob)]
            self.in_host_call = True

        def views(group):
            return [PyBlob(mirrors.get(id(b), b)) for b in group]

        try:
            if propagate_down is None:
                method(views(first), views(second))
            else:
                method(views(first), list(propagate_down), views(second))
        except Exception as err:
            frames = traceback.extract_tb(err.__traceback__)
            where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
            failure = self.fail(f"{type(self.impl).__name__}.{name} raised "
                                f"{type(err).__name__}: {err}{where}")
            failure.user_exception = err  # the user's own exception, with its traceback
            raise failure from err
        finally:
            if not on_host:
                self.in_host_call = False
                self._copy_back(blobs, mirrors)

    def _copy_back(self, blobs: list[Blob], mirrors: dict[int, Blob]) -> None:
        done = set()
        for blob in blobs:
            if id(blob) in done:
                continue
            done.add(id(blob))
            host = mirrors[id(blob)]
            if host.shape != blob.shape:
                blob.reshape(host.shape)
            blob.data[...] = backend.to_module(host.data, blob.xp)
            blob.diff[...] = backend.to_module(host.diff, blob.xp)
        for view, blob in zip(self.py_blobs, self.blobs):
            if blob.xp is np and self.xp is not np:  # added by add_blob during this call
                blob.to(self.xp)
            view._blob = blob

    def reshape(self, bottom, top) -> None:
        if self.impl is not None:
            self._call("reshape", bottom, top)

    def compute_forward(self, bottom, top) -> None:
        self._call("forward", bottom, top)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        self._call("backward", top, bottom, propagate_down=propagate_down)
