"""Layer families; importing this package registers every layer type.

Each family module registers its classes with ``@register``; new family files are picked up
automatically, so adding a layer never means editing this file.
"""
from __future__ import annotations

import importlib
import pkgutil

from netengine.layers.base import (REGISTRY, Layer, LossLayer, NeuronLayer, create_layer,
                                   layer_class, layer_type_list, register)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "Layer", "LossLayer", "NeuronLayer", "create_layer", "layer_class",
           "layer_type_list", "register"]
