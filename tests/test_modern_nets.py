"""Issue 3's modern nets: each builds at batch 1 with random weights and a forward pass on CPU
gives every blob the shape Caffe's formulas give (../shared/acceptance/computed_facts.json)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ACCEPTANCE, need_shared

import netengine

NETS = [
    "nets/kaiminghe_deep-residual-networks/prototxt/ResNet-50-deploy.prototxt",
    "nets/bvlc_caffe/models/bvlc_googlenet/deploy.prototxt",
    "nets/forresti_squeezenet/SqueezeNet_v1.1/deploy.prototxt",
    "nets/shicai_mobilenet-caffe/mobilenet_v2_deploy.prototxt",
    "nets/soeaver_caffe-model/cls/inception/deploy_inception-v3.prototxt",
]


def _facts(path: str) -> dict:
    facts = json.loads((ACCEPTANCE / "computed_facts.json").read_text())["files"]
    return next(f for f in facts if f["path"] == path)


@pytest.mark.parametrize("path", NETS, ids=lambda p: p.split("/")[-2])
def test_modern_net_forward_at_batch_1(path):
    need_shared("acceptance", path)
    facts = _facts(path)
    netengine.set_random_seed(5)
    net = netengine.Net(str(ACCEPTANCE / path), netengine.TEST)
    rng = np.random.default_rng(0)
    for name in net.inputs:
        shape = (1,) + tuple(net.blobs[name].shape[1:])
        net.blobs[name].reshape(shape)
        net.blobs[name].data[...] = rng.normal(size=shape)
    for blobs in net.params.values():
        for blob in blobs:
            if not blob.data.any():  # constant-0 default fillers: give the net something to do
                blob.data[...] = rng.normal(0, 0.05, blob.shape)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            layer.blobs[1].data[...] = 1.0  # variance sums
            layer.blobs[2].data[...] = 1.0  # scale factor
    out = net.forward()
    for layer_name, _type, top, shape in facts["shapes_TEST"]:
        assert net.blobs[top].shape[1:] == tuple(shape[1:]), (layer_name, top)
        assert net.blobs[top].shape[0] == 1
    for name, value in out.items():
        assert np.all(np.isfinite(value)), name
    prob = next(iter(out.values()))
    if prob.ndim >= 2 and prob.shape[1] >= 1000:
        np.testing.assert_allclose(prob.reshape(1, -1).sum(), 1.0, rtol=1e-4)
