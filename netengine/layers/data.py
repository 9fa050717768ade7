"""Data layers: where blobs enter the net (Input for deploy nets; readers for training)."""
from __future__ import annotations

from netengine.blob import Blob
from netengine.layers.base import Layer, register


@register
class Input(Layer):
    """Deploy-net input: tops of the shapes in input_param (one shape, or one per top).

    The data is written by the user (``net.blobs['data'].data[...] = x``); forward is a no-op
    and reshape keeps whatever shape the user gave the top since setup.
    """

    type = "Input"
    exact_bottoms = 0
    min_tops = 1
    is_input = True

    def layer_setup(self, bottom, top: list[Blob]) -> None:
        shapes = self.layer_param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise self.fail(f"input_param needs 0, 1 or {len(top)} shapes (one per top), "
                            f"got {len(shapes)}")
        for i, blob in enumerate(top):
            if shapes:
                dims = tuple(shapes[0 if len(shapes) == 1 else i].dim)
                if any(d < 0 for d in dims):
                    raise self.fail(f"input shape {dims} has a negative dimension")
                blob.reshape(dims)

    def reshape(self, bottom, top) -> None:
        pass

    def compute_forward(self, bottom, top) -> None:
        pass

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass
