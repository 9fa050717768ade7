"""Layer families; importing this package registers every layer type.

Each family module registers its classes with ``@register``; new family files are picked up
automatically, so adding a layer never means editing this file.
"""
from __future__ import annotations

import importlib
import pkgutil

from netengine.layers.base import (
    REGISTRY,
    Layer,
    LossLayer,
    NeuronLayer,
    create_layer,
    layer_class,
    layer_type_list,
    register,
)


def _import_families() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_families()


def __getattr__(name: str):
    # pycaffe's ``from caffe import layers as L``: L.Convolution(...) is net_spec's layer
    # factory. This package holds the implementations, so unknown names go to the factory.
    if name[:1].isupper():
        from netengine import net_spec

        return getattr(net_spec.layers, name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")

__all__ = ["REGISTRY", "Layer", "LossLayer", "NeuronLayer", "create_layer", "layer_class",
           "layer_type_list", "register"]
