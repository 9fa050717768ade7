"""Data, MemoryData, DummyData and HDF5Data layers; the MNIST nets' data sections."""
from __future__ import annotations

import gc
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import serve

from netengine import backend
from netengine.blob import Blob
from netengine.data.db import array_to_datum, is_leveldb, lmdb_key, write_leveldb, write_lmdb
from netengine.data.idx import read_idx, write_idx
from netengine.data.images import decode_image
from netengine.data.sources import resolve_source
from netengine.errors import NetEngineError
from netengine.proto import caffe_pb2
from netengine.testing import TEST, TRAIN, make_layer

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "data" / "mnist"
TRAIN_IMAGES = "data/mnist/train-images-idx3-ubyte.gz"


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


needs_lmdb = pytest.mark.skipif(not _have("lmdb"), reason="the lmdb package is not installed")
needs_h5py = pytest.mark.skipif(not _have("h5py"), reason="the h5py package is not installed")


def tops(n: int, xp=np, dtype=np.float64) -> list[Blob]:
    return [Blob((), dtype=dtype, xp=xp) for _ in range(n)]


def data_layer(source: str, batch: int = 4, extra: str = "", transform: str = "",
               phase: int = TRAIN, num_tops: int = 2, seed: int = 1701, xp=np):
    backend.set_random_seed(seed)
    text = (f'name: "mnist" type: "Data" top: "data" top: "label" '
            f'transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" batch_size: {batch} {extra} }}')
    layer = make_layer(text, phase)
    top = tops(num_tops, xp)
    layer.setup([], top)
    return layer, top


@pytest.fixture
def tiny_idx(tmp_path):
    """10 records of 1x6x5 with labels 0..9, as IDX files."""
    images = np.random.default_rng(0).integers(0, 256, (10, 6, 5), dtype=np.uint8)
    write_idx(tmp_path / "tiny-images-idx3-ubyte", images)
    write_idx(tmp_path / "tiny-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    return tmp_path / "tiny-images-idx3-ubyte", images


# -- Data on the embedded MNIST -------------------------------------------------------------------
def test_data_reads_embedded_mnist(xp):
    layer, top = data_layer(TRAIN_IMAGES, batch=64, transform="scale: 0.00390625", xp=xp)
    assert top[0].shape == (64, 1, 28, 28) and top[1].shape == (64,)
    images = read_idx(MNIST / "train-images-idx3-ubyte.gz")
    labels = read_idx(MNIST / "train-labels-idx1-ubyte.gz")
    (d0, l0), (d1, l1) = serve(layer, top, 2)
    assert d0.dtype == np.float64
    np.testing.assert_array_equal(d0[:, 0], images[:64] * 0.00390625)
    np.testing.assert_array_equal(l0, labels[:64])
    np.testing.assert_array_equal(l1, labels[64:128])
    assert d0.max() == 255 / 256 and d0.min() == 0
    layer.close()


def test_data_test_phase_and_single_top():
    layer, top = data_layer("data/mnist/t10k-images-idx3-ubyte", batch=100, phase=TEST,
                            num_tops=1)
    assert len(top) == 1 and top[0].shape == (100, 1, 28, 28)
    layer.forward([], top)
    np.testing.assert_array_equal(
        top[0].data[:, 0], read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:100])
    layer.close()


def test_data_wraps_around(tiny_idx):
    path, images = tiny_idx
    layer, top = data_layer(str(path), batch=4)
    batches = serve(layer, top, 4)
    expected = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    for (data, labels), want in zip(batches, expected):
        np.testing.assert_array_equal(labels, want)
        np.testing.assert_array_equal(data[:, 0], images[want])
    assert layer.batch_index == 4
    layer.close()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_seek_gives_bit_identical_batches(tiny_idx, prefetch):
    path, _ = tiny_idx
    settings = dict(batch=4, extra=f"prefetch: {prefetch}",
                    transform="mirror: true crop_size: 3 scale: 0.1 mean_value: 9")
    first, top = data_layer(str(path), **settings)
    run = serve(first, top, 6)
    first.close()
    resumed, top2 = data_layer(str(path), **settings)
    resumed.seek(3)
    assert resumed.batch_index == 3
    again = serve(resumed, top2, 3)
    for (d, lab), (d2, lab2) in zip(run[3:], again):
        np.testing.assert_array_equal(d, d2)
        np.testing.assert_array_equal(lab, lab2)
    # random transforms really vary between batches, and come from the seed
    assert any(not np.array_equal(run[0][0], b[0]) for b in run[1:])
    other, top3 = data_layer(str(path), seed=7, **settings)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(run, serve(other, top3, 6)))
    resumed.seek(0)
    np.testing.assert_array_equal(serve(resumed, top2, 1)[0][0], run[0][0])
    resumed.close()
    other.close()


def test_prefetch_and_synchronous_agree(tiny_idx):
    path, _ = tiny_idx
    a, ta = data_layer(str(path), extra="prefetch: 0", transform="mirror: true crop_size: 4")
    b, tb = data_layer(str(path), extra="prefetch: 2", transform="mirror: true crop_size: 4")
    for (x, _), (y, _) in zip(serve(a, ta, 5), serve(b, tb, 5)):
        np.testing.assert_array_equal(x, y)
    b.close()


def test_data_test_phase_centre_crop(tiny_idx):
    path, images = tiny_idx
    layer, top = data_layer(str(path), batch=2, transform="crop_size: 4", phase=TEST)
    assert top[0].shape == (2, 1, 4, 4)
    data, _ = serve(layer, top, 1)[0]
    np.testing.assert_array_equal(data[:, 0], images[:2, 1:5, 0:4])
    layer.close()


def test_data_train_crop_within_bounds(tiny_idx):
    path, images = tiny_idx
    layer, top = data_layer(str(path), batch=10, transform="crop_size: 3")
    data, _ = serve(layer, top, 1)[0]
    for k in range(10):
        assert any(np.array_equal(data[k, 0], images[k, h:h + 3, w:w + 3])
                   for h in range(4) for w in range(3))
    layer.close()


def test_data_mean_file_and_deprecated_data_param_fields(tiny_idx, tmp_path):
    from netengine.formats.prototxt import write_binary_proto

    path, images = tiny_idx
    mean = np.arange(30, dtype=np.float32).reshape(1, 1, 6, 5)
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend(mean.shape)
    proto.data.extend(mean.ravel().tolist())
    write_binary_proto(tmp_path / "mean.binaryproto", proto)
    layer, top = data_layer(str(path), batch=2, phase=TEST,
                            transform=f'mean_file: "{tmp_path / "mean.binaryproto"}" scale: 0.5')
    data, _ = serve(layer, top, 1)[0]
    np.testing.assert_array_equal(data, (images[:2, None].astype(np.float64) - mean) * 0.5)
    layer.close()
    # V1-style scale/crop_size inside data_param are honoured
    old, top = data_layer(str(path), batch=2, phase=TEST, extra="scale: 0.5 crop_size: 4")
    data, _ = serve(old, top, 1)[0]
    np.testing.assert_array_equal(data[:, 0], images[:2, 1:5, 0:4] * 0.5)
    old.close()


def test_data_rand_skip(tiny_idx):
    path, _ = tiny_idx
    layer, top = data_layer(str(path), batch=2, extra="rand_skip: 7")
    assert 0 <= layer.skip < 7
    labels = serve(layer, top, 1)[0][1]
    np.testing.assert_array_equal(labels, [(layer.skip + k) % 10 for k in range(2)])
    again, top2 = data_layer(str(path), batch=2, extra="rand_skip: 7")
    assert again.skip == layer.skip
    layer.close()
    again.close()


def test_prefetch_thread_shuts_down(tiny_idx):
    path, _ = tiny_idx
    layer, top = data_layer(str(path), extra="prefetch: 2")
    serve(layer, top, 2)
    thread = layer.prefetcher.thread
    assert thread.is_alive() and thread.daemon
    layer.close()
    assert not thread.is_alive() and not layer.prefetcher.running
    layer.close()  # twice is fine
    second, top = data_layer(str(path), extra="prefetch: 2")
    serve(second, top, 1)
    thread = second.prefetcher.thread
    del second
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert thread not in threading.enumerate()


def test_relative_source_resolution(tiny_idx, monkeypatch, tmp_path):
    path, _ = tiny_idx
    monkeypatch.chdir(tmp_path)
    layer, _ = data_layer(path.name)  # current folder
    layer.close()
    monkeypatch.chdir(REPO.parent)
    layer, _ = data_layer(TRAIN_IMAGES)  # repository root
    layer.close()
    sub = tmp_path / "nets"
    sub.mkdir()
    backend.set_random_seed(0)
    layer = make_layer(f'type: "Data" top: "d" data_param {{ source: "../{path.name}" '
                       f'batch_size: 1 }}')
    layer.search_dirs = (str(sub),)  # what the net sets: the prototxt's folder
    layer.setup([], tops(1))
    layer.close()


# -- Data on LMDB ---------------------------------------------------------------------------------
@needs_lmdb
def test_data_reads_lmdb_written_by_convert_mnist(tmp_path):
    from netengine.cli import convert_mnist

    db = tmp_path / "mnist_test_lmdb"
    assert convert_mnist.main([str(MNIST / "t10k-images-idx3-ubyte.gz"),
                               str(MNIST / "t10k-labels-idx1-ubyte.gz"), str(db)]) == 0
    idx, top_i = data_layer("data/mnist/t10k-images-idx3-ubyte.gz", batch=100, phase=TEST,
                            transform="scale: 0.00390625")
    for backend_text in ("backend: LMDB", ""):  # the LEVELDB default still finds an LMDB
        lm, top_l = data_layer(str(db), batch=100, phase=TEST, transform="scale: 0.00390625",
                               extra=backend_text)
        for (a, la), (b, lb) in zip(serve(idx, top_i, 2), serve(lm, top_l, 2)):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(la, lb)
        lm.close()
        idx.seek(0)
    idx.close()


@needs_lmdb
def test_data_error_in_prefetch_thread_reaches_forward(tmp_path):
    good = array_to_datum(np.zeros((1, 2, 2), np.uint8), 1).SerializeToString()
    items = [(lmdb_key(i), good if i != 3 else b"\x08\x01\x10\x02\x18\x02")
             for i in range(4)]
    write_lmdb(tmp_path / "db", items)
    layer, top = data_layer(str(tmp_path / "db"), batch=2, extra="backend: LMDB prefetch: 2")
    layer.forward([], top)
    with pytest.raises(NetEngineError) as info:
        layer.forward([], top)
    message = str(info.value)
    assert "layer 'mnist' (Data)" in message and "batch 1" in message
    assert "holds 0 float values, expected 4" in message
    layer.close()


def _png(pixels: np.ndarray) -> bytes:
    import io

    image_module = pytest.importorskip("PIL.Image")
    out = io.BytesIO()
    image_module.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@needs_lmdb
def test_data_decodes_encoded_records(tmp_path):
    """convert_imageset --encoded: PNG bytes in the Datum, decoded BGR (colour) or gray as
    stored, or as force_color / force_gray ask."""
    rgb = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5, 3)).astype(np.uint8)
    gray = rgb[..., 0]
    for name, images in (("rgb", rgb), ("gray", gray)):
        items = [(lmdb_key(i), caffe_pb2.Datum(encoded=True, data=_png(im), label=i)
                  .SerializeToString()) for i, im in enumerate(images)]
        write_lmdb(tmp_path / name, items)
    layer, top = data_layer(str(tmp_path / "rgb"), batch=3, extra="backend: LMDB prefetch: 0",
                            phase=TEST)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, rgb[..., ::-1].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(top[1].data, [0, 1, 2])
    layer, top = data_layer(str(tmp_path / "gray"), batch=3, extra="backend: LMDB prefetch: 0",
                            phase=TEST)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, gray[:, None])  # native: gray stays gray
    layer, top = data_layer(str(tmp_path / "gray"), batch=3, transform="force_color: true",
                            extra="backend: LMDB prefetch: 0", phase=TEST)
    assert top[0].shape == (3, 3, 4, 5)
    layer, top = data_layer(str(tmp_path / "rgb"), batch=3, transform="force_gray: true",
                            extra="backend: LMDB prefetch: 0", phase=TEST)
    assert top[0].shape == (3, 1, 4, 5)
    with pytest.raises(NetEngineError, match="cannot set both force_color and force_gray"):
        data_layer(str(tmp_path / "rgb"), transform="force_color: true force_gray: true",
                   extra="backend: LMDB")


@needs_lmdb
def test_data_crops_records_of_different_sizes(tmp_path):
    rng = np.random.default_rng(1)
    records = [rng.integers(0, 256, size=shape).astype(np.uint8)
               for shape in [(1, 6, 5), (1, 4, 4), (1, 5, 7)]]
    items = [(lmdb_key(i), array_to_datum(r, i).SerializeToString())
             for i, r in enumerate(records)]
    write_lmdb(tmp_path / "db", items)
    source = str(tmp_path / "db")
    layer, top = data_layer(source, batch=3, transform="crop_size: 3 scale: 0.5",
                            extra="backend: LMDB prefetch: 0", phase=TEST)
    layer.forward([], top)
    for i, r in enumerate(records):  # TEST: the centre crop of each, as Caffe
        h, w = (r.shape[1] - 3) // 2, (r.shape[2] - 3) // 2
        np.testing.assert_array_equal(top[0].data[i], r[:, h:h + 3, w:w + 3] * 0.5)
    layer, top = data_layer(source, batch=3, transform="crop_size: 3 mirror: true",
                            extra="backend: LMDB prefetch: 0", phase=TRAIN)
    layer.forward([], top)
    for i, r in enumerate(records):  # TRAIN: some window of each record, maybe mirrored
        windows = [r[0, a:a + 3, b:b + 3] for a in range(r.shape[1] - 2)
                   for b in range(r.shape[2] - 2)]
        got = top[0].data[i, 0]
        assert any(np.array_equal(got, win) or np.array_equal(got, win[:, ::-1])
                   for win in windows)
    layer, top = data_layer(source, batch=3, extra="backend: LMDB prefetch: 0")
    with pytest.raises(NetEngineError, match=r"without transform_param.crop_size \(or "
                                             r"batch_size 1\) a Data layer needs records"):
        layer.forward([], top)
    layer, top = data_layer(source, batch=1, extra="backend: LMDB prefetch: 0")
    for r in records:  # one record per batch: the top takes each record's shape, as Caffe
        layer.forward([], top)
        assert top[0].shape == (1, *r.shape)
        np.testing.assert_array_equal(top[0].data[0], r)


def test_decode_image_turns_exif_orientation_and_keeps_16_bit_high_bytes(tmp_path):
    import io

    image_module = pytest.importorskip("PIL.Image")
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)
    out = io.BytesIO()
    exif = image_module.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    image_module.fromarray(pixels).save(out, format="PNG", exif=exif)
    turned = decode_image(out.getvalue())
    assert turned.shape == (3, 3, 2) and turned[2, 0, 1] == 255  # red, now top-right, in BGR
    deep = (np.arange(4, dtype=np.uint16) * 2048 + 100).reshape(1, 4)
    decoded = decode_image(_png(deep), is_color=False)
    np.testing.assert_array_equal(decoded[0, 0], [0, 8, 16, 24])
    with pytest.raises(NetEngineError, match="cannot decode image x: not an image format"):
        decode_image(b"not an image", name="x")


# -- Data errors ----------------------------------------------------------------------------------
def test_missing_source_names_the_path():
    with pytest.raises(NetEngineError) as info:
        data_layer("no/such/train-images-idx3-ubyte")
    message = str(info.value)
    assert "no/such/train-images-idx3-ubyte" in message and "not found" in message
    assert "layer 'mnist' (Data)" in message and "\n" not in message


needs_plyvel = pytest.mark.skipif(not _have("plyvel"), reason="plyvel is not installed")


@needs_plyvel
def test_data_reads_leveldb_caffes_default_backend(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(5, 1, 3, 4)).astype(np.uint8)
    items = [(lmdb_key(i), array_to_datum(im, 10 + i).SerializeToString())
             for i, im in enumerate(images)]
    db = tmp_path / "train_leveldb"
    assert write_leveldb(db, items) == 5
    assert is_leveldb(db)
    for extra in ("backend: LEVELDB prefetch: 0", "prefetch: 0"):  # LEVELDB is the default
        layer, top = data_layer(str(db), batch=3, extra=extra, phase=TEST)
        layer.forward([], top)
        np.testing.assert_array_equal(top[0].data, images[:3])
        np.testing.assert_array_equal(top[1].data, [10, 11, 12])
        layer.forward([], top)  # wraps around, as Caffe's cursor
        np.testing.assert_array_equal(top[1].data, [13, 14, 10])
        layer.close()
    with pytest.raises(NetEngineError, match="already holds a LevelDB"):
        write_leveldb(db, items)


def test_leveldb_errors(tmp_path, monkeypatch):
    fake = tmp_path / "mnist_train_leveldb"
    fake.mkdir()
    (fake / "CURRENT").write_text("MANIFEST-000001\n")
    if _have("plyvel"):
        with pytest.raises(NetEngineError, match=f"cannot open LevelDB {fake}"):
            data_layer(str(fake), extra="backend: LEVELDB")
    monkeypatch.setitem(sys.modules, "plyvel", None)
    with pytest.raises(NetEngineError, match=r"LEVELDB databases need the plyvel package: pip "
                                             r"install 'netengine\[leveldb\]'") as info:
        data_layer(str(fake))
    assert "layer 'mnist' (Data)" in str(info.value)
    lmdb_dir = tmp_path / "lmdb"
    lmdb_dir.mkdir()
    (lmdb_dir / "data.mdb").write_bytes(b"")
    with pytest.raises(NetEngineError, match="set backend: LMDB"):
        data_layer(str(lmdb_dir), extra="backend: LEVELDB")
    with pytest.raises(NetEngineError, match="neither an LMDB folder"):
        data_layer(str(tmp_path))


def test_lmdb_missing_message(tmp_path, monkeypatch):
    lmdb_dir = tmp_path / "lmdb"
    lmdb_dir.mkdir()
    (lmdb_dir / "data.mdb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(NetEngineError) as info:
        data_layer(str(lmdb_dir), extra="backend: LMDB")
    message = str(info.value)
    assert "lmdb package" in message and "pip install 'netengine[lmdb]'" in message
    assert "layer 'mnist' (Data)" in message


def test_data_parameter_errors(tiny_idx):
    path, _ = tiny_idx
    with pytest.raises(NetEngineError, match="batch_size must be positive"):
        data_layer(str(path), batch=0)
    with pytest.raises(NetEngineError, match="crop_size 7 exceeds"):
        data_layer(str(path), transform="crop_size: 7")
    with pytest.raises(NetEngineError, match="mean_file or mean_value, not both"):
        data_layer(str(path), transform='mean_file: "m" mean_value: 1')
    with pytest.raises(NetEngineError, match="transform_param.mean_file not found"):
        data_layer(str(path), transform='mean_file: "no_mean.binaryproto"')


def test_mean_file_errors_name_the_mean_file(tiny_idx, tmp_path):
    from netengine.formats.prototxt import write_binary_proto

    path, _ = tiny_idx
    wrong = tmp_path / "wrong.binaryproto"
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([1, 1, 3, 3])
    proto.data.extend([0.0] * 9)
    write_binary_proto(wrong, proto)
    with pytest.raises(NetEngineError, match=f"mean file {wrong} has shape \\(1, 3, 3\\)"):
        data_layer(str(path), transform=f'mean_file: "{wrong}"')
    short = tmp_path / "short.binaryproto"
    del proto.data[5:]
    write_binary_proto(short, proto)
    with pytest.raises(NetEngineError, match=f"mean file {short}: blob has 5 values"):
        data_layer(str(path), transform=f'mean_file: "{short}"')
    with pytest.raises(NetEngineError, match="data_param.source is empty"):
        data_layer("")
    layer, _ = data_layer(str(path))
    with pytest.raises(NetEngineError, match="batch index >= 0"):
        layer.seek(-1)
    layer.close()


# -- the MNIST nets -------------------------------------------------------------------------------
def test_mnist_train_test_net_data_sections():
    from netengine.formats.prototxt import read_text_proto

    net, _ = read_text_proto(REPO / "nets" / "mnist_train_test.prototxt",
                             caffe_pb2.NetParameter())
    data = [layer for layer in net.layer if layer.type == "Data"]
    assert [(d.include[0].phase, d.data_param.batch_size) for d in data] == \
        [(TRAIN, 64), (TEST, 100)]
    assert all(d.transform_param.scale == np.float32(0.00390625) for d in data)
    for d in data:
        assert resolve_source(REPO / d.data_param.source) is not None
    solver, _ = read_text_proto(REPO / "nets" / "mnist_solver.prototxt",
                                caffe_pb2.SolverParameter())
    assert solver.test_iter[0] * data[1].data_param.batch_size == 2000
    assert (solver.base_lr, solver.lr_policy, solver.max_iter, solver.random_seed) == \
        (np.float32(0.01), "inv", 10000, 1701)


def test_mnist_nets_match_caffes_lenet():
    """Every layer and parameter of Caffe's LeNet files, only the data sources differ."""
    from conftest import need_shared

    from netengine.formats.prototxt import read_text_proto

    folder = need_shared("acceptance", "nets", "bvlc_caffe", "examples", "mnist")
    for ours, theirs in (("mnist_train_test.prototxt", "lenet_train_test.prototxt"),
                         ("mnist_deploy.prototxt", "lenet.prototxt")):
        a, _ = read_text_proto(REPO / "nets" / ours, caffe_pb2.NetParameter())
        b, _ = read_text_proto(folder / theirs, caffe_pb2.NetParameter())
        assert a.name == b.name and len(a.layer) == len(b.layer)
        for x, y in zip(a.layer, b.layer):
            if x.type != "Data":
                assert x == y, x.name
            else:
                assert x.data_param.batch_size == y.data_param.batch_size
                x2, y2 = caffe_pb2.LayerParameter(), caffe_pb2.LayerParameter()
                x2.CopyFrom(x)
                y2.CopyFrom(y)
                x2.ClearField("data_param")
                y2.ClearField("data_param")
                assert x2 == y2, x.name


def test_mnist_data_layer_in_a_net(tmp_path):
    from netengine.net import Net

    net_text = (REPO / "nets" / "mnist_train_test.prototxt").read_text()
    head = net_text[:net_text.index('layer {\n  name: "conv1"')]
    (tmp_path / "data_only.prototxt").write_text(head)
    net = Net(str(tmp_path / "data_only.prototxt"), TEST)
    out = net.forward()
    assert out["data"].shape == (100, 1, 28, 28) and out["label"].shape == (100,)
    assert net.layers[0].batch_index == 1
    net.layers[0].close()


# -- MemoryData -----------------------------------------------------------------------------------
def memory_layer(xp=np, batch=2):
    layer = make_layer(f'type: "MemoryData" top: "data" top: "label" memory_data_param {{ '
                       f'batch_size: {batch} channels: 1 height: 2 width: 3 }}')
    top = tops(2, xp)
    layer.setup([], top)
    return layer, top


def test_memory_data_serves_arrays_in_order(xp):
    layer, top = memory_layer(xp)
    assert top[0].shape == (2, 1, 2, 3) and top[1].shape == (2,)
    data = np.arange(6 * 6, dtype=np.float32).reshape(6, 1, 2, 3)
    labels = np.arange(6, dtype=np.float32)
    layer.set_input_arrays(data, labels)
    data[...] = -1  # copied: later changes do not matter
    got = []
    for _ in range(4):
        layer.forward([], top)
        got.append(backend.to_host(top[1].data).tolist())
    assert got == [[0, 1], [2, 3], [4, 5], [0, 1]]
    np.testing.assert_array_equal(backend.to_host(top[0].data),
                                  np.arange(12).reshape(2, 1, 2, 3))
    layer.seek(2)
    layer.forward([], top)
    assert backend.to_host(top[1].data).tolist() == [4, 5]
    layer.reset(np.zeros((2, 1, 2, 3)), np.ones((2, 1, 1, 1)))
    layer.forward([], top)
    assert backend.to_host(top[1].data).tolist() == [1, 1]
    layer.set_batch_size(1)
    layer.forward([], top)
    assert top[0].shape == (1, 1, 2, 3)


def test_memory_data_errors():
    layer, top = memory_layer()
    with pytest.raises(NetEngineError, match="call set_input_arrays"):
        layer.forward([], top)
    with pytest.raises(NetEngineError, match=r"data of shape \(N, 1, 2, 3\)"):
        layer.set_input_arrays(np.zeros((2, 1, 3, 2)), np.zeros(2))
    with pytest.raises(NetEngineError, match="2 labels"):
        layer.set_input_arrays(np.zeros((2, 1, 2, 3)), np.zeros(3))
    with pytest.raises(NetEngineError, match="multiple of batch_size 2"):
        layer.set_input_arrays(np.zeros((3, 1, 2, 3)), np.zeros(3))
    with pytest.raises(NetEngineError, match="all positive"):
        make_layer('type: "MemoryData" top: "a" top: "b" memory_data_param { batch_size: 2 }'
                   ).setup([], tops(2))
    with pytest.raises(NetEngineError, match="exactly 2 top"):
        make_layer('type: "MemoryData" top: "a" memory_data_param { batch_size: 1 channels: 1 '
                   'height: 1 width: 1 }').setup([], tops(1))


# -- DummyData ------------------------------------------------------------------------------------
def dummy(text: str, n: int, xp=np):
    backend.set_random_seed(3)
    layer = make_layer(f'type: "DummyData" dummy_data_param {{ {text} }}')
    top = tops(n, xp)
    layer.setup([], top)
    return layer, top


def test_dummy_data_shapes_and_default_zero(xp):
    layer, top = dummy("shape { dim: 2 dim: 3 } shape { dim: 4 }", 2, xp)
    assert [t.shape for t in top] == [(2, 3), (4,)]
    layer.forward([], top)
    assert all(float(abs(t.data).sum()) == 0 for t in top)
    layer, top = dummy("shape { dim: 5 }", 3)
    assert [t.shape for t in top] == [(5,)] * 3
    layer, top = dummy("num: 2 num: 3 channels: 1 height: 4 width: 5", 2)
    assert [t.shape for t in top] == [(2, 1, 4, 5), (3, 1, 4, 5)]


def test_dummy_data_refills_only_random_fillers():
    layer, top = dummy('shape { dim: 3 dim: 4 } shape { dim: 2 } '
                       'data_filler { type: "gaussian" std: 1 } '
                       'data_filler { type: "constant" value: 7 }', 2)
    first = top[0].data.copy()
    assert np.all(top[1].data == 7) and np.abs(first).sum() > 0
    top[1].data[...] = 0  # a constant top is filled once, at setup (Caffe's rule)
    layer.forward([], top)
    assert not np.array_equal(first, top[0].data)
    assert np.all(top[1].data == 0)
    layer, top = dummy('shape { dim: 3 } data_filler { type: "uniform" min: 2 max: 3 }', 2)
    assert all(np.all((t.data >= 2) & (t.data <= 3)) for t in top)
    layer, top = dummy('shape { dim: 3 } data_filler { type: "constant" value: 2 }', 2)
    assert layer.refill == [False, False] and all(np.all(t.data == 2) for t in top)


@pytest.mark.parametrize("text, n, expected", [
    ("shape { dim: 1 } shape { dim: 2 }", 3, "needs 1 shape \\(shared\\) or 3 \\(one per top\\), got 2"),
    ("num: 1 channels: 1 height: 1", 1, "'width' value"),
    ("num: 1 channels: 1 height: 1 width: 1 shape { dim: 1 }", 1, "not both"),
    ('shape { dim: 1 } data_filler { type: "constant" } data_filler { type: "constant" }', 3,
     "0, 1 or 3 data_filler"),
    ('shape { dim: 1 } data_filler { type: "gausian" }', 1, "unknown filler type 'gausian'"),
    ("", 1, "dummy_data_param needs 1 shape, got 0"),
])
def test_dummy_data_errors(text, n, expected):
    with pytest.raises(NetEngineError, match=expected) as info:
        dummy(text, n)
    assert "(DummyData)" in str(info.value)


# -- HDF5Output -----------------------------------------------------------------------------------
def test_hdf5_output_writes_the_last_batch(tmp_path):
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "out.h5"
    out.write_text("old content")  # truncated at setup
    layer = make_layer(f'type: "HDF5Output" hdf5_output_param {{ file_name: "{out}" }}')
    data, label = Blob((3, 2, 2), dtype=np.float32), Blob((3,), dtype=np.float32)
    layer.setup([data, label], [])
    with h5py.File(out, "r") as f:
        assert list(f) == []
    for k in range(2):
        data.data[...] = np.arange(12).reshape(3, 2, 2) + 100 * k
        label.data[...] = [k, k + 1, k + 2]
        layer.forward([data, label], [])
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["data"][()], np.arange(12).reshape(3, 2, 2) + 100)
        np.testing.assert_array_equal(f["label"][()], [1, 2, 3])
        assert f["data"].dtype == np.float32
    layer.backward([], [True, True], [data, label])  # no gradient, no error
    with pytest.raises(NetEngineError, match="same number of items"):
        layer.forward([data, Blob((4,), dtype=np.float32)], [])
    with pytest.raises(NetEngineError, match="file_name must be given"):
        make_layer('type: "HDF5Output"').setup([data, label], [])


# -- HDF5Data -------------------------------------------------------------------------------------
@pytest.fixture
def h5_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    rows = [3, 4]
    start = 0
    for k, n in enumerate(rows):
        with h5py.File(tmp_path / f"part{k}.h5", "w") as f:
            f["data"] = np.arange(start, start + n, dtype=np.float32)[:, None, None] * \
                np.ones((1, 2, 2), np.float32)
            f["label"] = np.arange(start, start + n, dtype=np.float64)
        start += n
    (tmp_path / "list.txt").write_text("part0.h5\n\npart1.h5\n")
    return tmp_path


def test_hdf5_source_given_an_h5_file_says_it_wants_a_list(h5_files):
    with pytest.raises(NetEngineError, match=r"part0\.h5 is a binary file \(an \.h5 itself\?\)"):
        make_layer(f'type: "HDF5Data" top: "data" hdf5_data_param {{ '
                   f'source: "{h5_files / "part0.h5"}" batch_size: 2 }}').setup([], tops(1))


def hdf5_layer(folder: Path, batch: int, shuffle: bool = False):
    backend.set_random_seed(11)
    layer = make_layer(f'type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
                       f'source: "{folder / "list.txt"}" batch_size: {batch} '
                       f'shuffle: {str(shuffle).lower()} }}')
    top = tops(2)
    layer.setup([], top)
    return layer, top


@needs_h5py
def test_hdf5_data_reads_files_in_order_and_wraps(h5_files):
    layer, top = hdf5_layer(h5_files, 5)
    assert top[0].shape == (5, 2, 2) and top[1].shape == (5,)
    got = [serve(layer, top, 1)[0] for _ in range(3)]
    assert [g[1].tolist() for g in got] == [[0, 1, 2, 3, 4], [5, 6, 0, 1, 2], [3, 4, 5, 6, 0]]
    np.testing.assert_array_equal(got[0][0][:, 0, 0], [0, 1, 2, 3, 4])
    layer.seek(1)
    assert serve(layer, top, 1)[0][1].tolist() == [5, 6, 0, 1, 2]
    assert layer.batch_index == 2


@needs_h5py
def test_hdf5_data_shuffle_is_seeded_and_seekable(h5_files):
    layer, top = hdf5_layer(h5_files, 3, shuffle=True)
    run = [serve(layer, top, 1)[0][1].tolist() for _ in range(6)]
    flat = sum(run, [])
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert flat[:7] != list(range(7)) or flat[7:14] != list(range(7))
    again, top2 = hdf5_layer(h5_files, 3, shuffle=True)
    again.seek(4)
    assert [serve(again, top2, 1)[0][1].tolist() for _ in range(2)] == run[4:]


@needs_h5py
def test_hdf5_data_errors(h5_files, tmp_path):
    backend.set_random_seed(0)
    layer = make_layer(f'type: "HDF5Data" top: "data" top: "weights" hdf5_data_param {{ '
                       f'source: "{h5_files / "list.txt"}" batch_size: 2 }}')
    with pytest.raises(NetEngineError, match="has no dataset 'weights'"):
        layer.setup([], tops(2))
    layer = make_layer(f'type: "HDF5Data" top: "data" transform_param {{ scale: 2 }} '
                       f'hdf5_data_param {{ source: "{h5_files / "list.txt"}" batch_size: 2 }}')
    with pytest.raises(NetEngineError, match="does not transform data"):
        layer.setup([], tops(1))
    (tmp_path / "empty.txt").write_text("\n")
    layer = make_layer(f'type: "HDF5Data" top: "data" hdf5_data_param {{ '
                       f'source: "{tmp_path / "empty.txt"}" batch_size: 2 }}')
    with pytest.raises(NetEngineError, match="lists no HDF5 files"):
        layer.setup([], tops(1))
    (tmp_path / "missing.txt").write_text("nope.h5\n")
    layer = make_layer(f'type: "HDF5Data" top: "data" hdf5_data_param {{ '
                       f'source: "{tmp_path / "missing.txt"}" batch_size: 2 }}')
    with pytest.raises(NetEngineError, match="nope.h5"):
        layer.setup([], tops(1))


def test_hdf5_data_without_h5py(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    layer = make_layer('type: "HDF5Data" top: "data" hdf5_data_param { source: "x" '
                       'batch_size: 1 }')
    with pytest.raises(NetEngineError) as info:
        layer.setup([], tops(1))
    assert "pip install 'netengine[hdf5]'" in str(info.value)
    assert "(HDF5Data)" in str(info.value)


@needs_lmdb
def test_caffes_own_lenet_reads_convert_mnist_lmdbs(tmp_path, monkeypatch):
    """Caffe's lenet_train_test.prototxt, unmodified, over LMDBs written by convert_mnist."""
    from conftest import need_shared

    from netengine.cli import convert_mnist
    from netengine.net import Net

    original = need_shared("acceptance", "nets", "bvlc_caffe", "examples", "mnist",
                           "lenet_train_test.prototxt")
    folder = tmp_path / "examples" / "mnist"
    folder.mkdir(parents=True)
    (folder / "lenet_train_test.prototxt").write_bytes(original.read_bytes())
    for split, prefix in (("train", "train"), ("test", "t10k")):
        assert convert_mnist.main([str(MNIST / f"{prefix}-images-idx3-ubyte.gz"),
                                   str(MNIST / f"{prefix}-labels-idx1-ubyte.gz"),
                                   str(folder / f"mnist_{split}_lmdb")]) == 0
    monkeypatch.chdir(tmp_path)
    backend.set_random_seed(1701)
    for phase, batch in ((TRAIN, 64), (TEST, 100)):
        net = Net("examples/mnist/lenet_train_test.prototxt", phase)
        out = net.forward()
        assert net.blobs["data"].shape == (batch, 1, 28, 28)
        assert np.isfinite(float(out["loss"]))
        net.layers[0].close()


def test_net_set_input_arrays_errors_name_file_line_and_layer(tmp_path):
    from netengine.net import Net

    path = tmp_path / "mem.prototxt"
    path.write_text('layer { name: "feed" type: "MemoryData" top: "a" top: "b"\n'
                    '  memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }\n')
    net = Net(str(path), TRAIN)
    with pytest.raises(NetEngineError, match=r"mem\.prototxt:1: layer 'feed' \(MemoryData\): "
                                             r"set_input_arrays needs data of shape"):
        net.set_input_arrays(np.zeros((2, 1, 3, 2), np.float32), np.zeros(2, np.float32))


def test_unseeded_data_layers_draw_their_own_seed(tiny_idx, monkeypatch):
    """As Caffe seeds itself from the OS when random_seed is unset: shuffles, crops and
    rand_skip differ from run to run; a set seed repeats them."""
    path, _ = tiny_idx
    seeded = [data_layer(str(path), seed=5)[0].seed for _ in range(2)]
    assert seeded[0] == seeded[1] == 5
    monkeypatch.setattr(backend, "get_random_seed", lambda: None)
    drawn = [data_layer(str(path))[0].seed for _ in range(2)]
    assert drawn[0] != drawn[1]


def test_data_layers_log_the_file_they_read(tiny_idx, monkeypatch):
    from netengine.layers import data as data_module

    lines = []
    monkeypatch.setattr(data_module.log, "info", lambda msg, *a, **k: lines.append(msg % a))
    path, _ = tiny_idx
    data_layer(str(path))
    assert lines == [f"Data 'mnist': data_param.source {path.resolve()}"]
