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

__all__ = ["REGISTRY", "Layer", "LossLayer", "NeuronLayer", "create_layer", "layer_class",
           "layer_type_list", "register"]
