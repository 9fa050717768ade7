"""IDX and LMDB files, Datum records, the Transformer, the embedded MNIST split and the
get_mnist / convert_mnist tools (no network: downloads are exercised with file:// mirrors)."""
from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from netengine.cli import convert_mnist, get_mnist
from netengine.data import sources
from netengine.data.db import (
    LevelDBSource,
    LMDBSource,
    array_to_datum,
    datum_to_array,
    decode_datum,
    import_lmdb,
    is_leveldb,
    is_lmdb,
    lmdb_key,
    read_lmdb_items,
    write_lmdb,
)
from netengine.data.idx import IDXSource, idx_labels_path, is_idx_images, read_idx, write_idx
from netengine.data.sources import REPO_ROOT, add_search_dir, resolve_source, search_description
from netengine.data.transform import Transformer, read_mean_file
from netengine.errors import NetEngineError
from netengine.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "data" / "mnist"
def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


needs_lmdb = pytest.mark.skipif(not _have("lmdb"), reason="the lmdb package is not installed")


# -- IDX ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    array = (np.arange(2 * 3 * 5) * 7 - 40).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / name
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_mnist_layout(tmp_path):
    write_idx(tmp_path / "a", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "b", np.zeros(4, np.uint8))
    assert int.from_bytes((tmp_path / "a").read_bytes()[:4], "big") == 2051
    assert int.from_bytes((tmp_path / "b").read_bytes()[:4], "big") == 2049
    assert (tmp_path / "a").stat().st_size == 16 + 4 * 784


def test_idx_gzip_is_detected_by_content_and_reproducible(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "plain-name", array, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), array)
    write_idx(tmp_path / "again", array, compress=True)
    assert (tmp_path / "plain-name").read_bytes() == (tmp_path / "again").read_bytes()


@pytest.mark.parametrize("data, expected", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX type code 0x07"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x00\x01", "truncated IDX file"),
])
def test_idx_errors(tmp_path, data, expected):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(NetEngineError, match=expected) as info:
        read_idx(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(info.value)
    with pytest.raises(NetEngineError, match="file not found"):
        read_idx(tmp_path / "absent")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(NetEngineError, match="corrupt gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(NetEngineError, match="cannot hold"):
        write_idx(tmp_path / "u16", np.zeros(3, np.uint16))


def test_labels_path_and_source_resolution(tmp_path, monkeypatch):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"")
    (tmp_path / "images-idx3-ubyte").write_bytes(b"")
    (tmp_path / "labels-idx1-ubyte.gz").write_bytes(b"")
    assert is_idx_images("a/train-images-idx3-ubyte.gz")
    assert not is_idx_images("a/train-labels-idx1-ubyte")
    assert idx_labels_path(tmp_path / "train-images-idx3-ubyte.gz") == \
        tmp_path / "train-labels-idx1-ubyte"
    assert idx_labels_path(tmp_path / "images-idx3-ubyte") == \
        tmp_path / "labels-idx1-ubyte.gz"
    assert idx_labels_path(tmp_path / "none-idx3-ubyte") is None
    monkeypatch.chdir(tmp_path)
    # current folder first; X finds X.gz and X.gz finds X
    assert resolve_source("train-images-idx3-ubyte") == \
        tmp_path / "train-images-idx3-ubyte.gz"
    assert resolve_source("train-labels-idx1-ubyte.gz") == \
        tmp_path / "train-labels-idx1-ubyte"
    assert resolve_source("train-labels-idx1-ubyte.gz", gz=False) is None
    # then extra folders, then SEARCH_DIRS (the repository root)
    other = tmp_path / "other"
    other.mkdir()
    (other / "only-here").write_bytes(b"")
    monkeypatch.chdir(REPO)
    assert resolve_source("only-here", [other]) == other / "only-here"
    monkeypatch.chdir(tmp_path)
    assert resolve_source("data/mnist/t10k-images-idx3-ubyte") == \
        MNIST / "t10k-images-idx3-ubyte.gz"
    monkeypatch.setattr(sources, "SEARCH_DIRS", list(sources.SEARCH_DIRS))
    add_search_dir(other)
    assert sources.SEARCH_DIRS[-1] == REPO_ROOT
    assert sources.SEARCH_DIRS[-2] == other.resolve()
    assert resolve_source("only-here") == other / "only-here"
    assert "looked in" in search_description("nowhere")


# -- the embedded split -----------------------------------------------------------------------------
def test_embedded_mnist_split():
    train = IDXSource(MNIST / "train-images-idx3-ubyte.gz")
    test = IDXSource(MNIST / "t10k-images-idx3-ubyte.gz")
    assert (len(train), len(test)) == (8000, 2000)
    assert train.shape == test.shape == (1, 28, 28)
    assert train.images.dtype == np.uint8 and train.images.max() == 255
    assert set(np.unique(train.labels)) == set(range(10)) == set(np.unique(test.labels))
    # shuffled, not grouped by label
    assert (np.diff(train.labels[:200].astype(int)) != 0).sum() > 100
    readme = (MNIST / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "LeCun" in readme and "Cazala" in readme
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert hashlib.sha256((MNIST / name).read_bytes()).hexdigest() in readme


def test_embedded_split_reproduces_from_source():
    from conftest import need_shared

    source = need_shared("data", "mnist-npm10k")
    images = read_idx(source / "images-idx3-ubyte.gz")
    labels = read_idx(source / "labels-idx1-ubyte.gz")
    order = np.random.default_rng(1701).permutation(10000)
    np.testing.assert_array_equal(read_idx(MNIST / "train-images-idx3-ubyte.gz"),
                                  images[order[:8000]])
    np.testing.assert_array_equal(read_idx(MNIST / "t10k-labels-idx1-ubyte.gz"),
                                  labels[order[8000:]])


# -- Datum ------------------------------------------------------------------------------------------
def test_datum_round_trip():
    image = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    datum = array_to_datum(image, 7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (2, 3, 4, 7)
    assert datum.data == image.tobytes() and not datum.float_data
    back, label = decode_datum(datum.SerializeToString())
    np.testing.assert_array_equal(back, image)
    assert label == 7
    floats = array_to_datum(np.full((5, 6), 0.25), 3)
    back, label = datum_to_array(floats)
    assert back.shape == (1, 5, 6) and back.dtype == np.float32 and np.all(back == 0.25)


def test_datum_errors():
    with pytest.raises(NetEngineError, match="encoded"):
        datum_to_array(caffe_pb2.Datum(channels=1, height=1, width=1, data=b"x",
                                                encoded=True))
    with pytest.raises(NetEngineError, match="holds 2 bytes, expected 4"):
        datum_to_array(caffe_pb2.Datum(channels=1, height=2, width=2, data=b"xy"))
    with pytest.raises(NetEngineError, match="not a serialized Datum"):
        decode_datum(b"\xff\xff\xff")
    with pytest.raises(NetEngineError, match=r"\(C, H, W\)"):
        array_to_datum(np.zeros((1, 1, 1, 1), np.uint8))


# -- LMDB -------------------------------------------------------------------------------------------
@needs_lmdb
def test_lmdb_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 4, 3), dtype=np.uint8)
    items = [(lmdb_key(i), array_to_datum(img, i % 3).SerializeToString())
             for i, img in enumerate(images)]
    assert write_lmdb(tmp_path / "db", items, commit_every=2) == 5
    assert is_lmdb(tmp_path / "db") and not is_leveldb(tmp_path / "db")
    stored = read_lmdb_items(tmp_path / "db")
    assert [k for k, _ in stored] == [b"00000000", b"00000001", b"00000002", b"00000003",
                                      b"00000004"]
    source = LMDBSource(tmp_path / "db")
    assert len(source) == 5 and source.shape == (1, 4, 3)
    got, labels = source.read(np.array([4, 0, 2]))
    np.testing.assert_array_equal(got, images[[4, 0, 2]])
    np.testing.assert_array_equal(labels, [1, 0, 2])
    source.close()
    with pytest.raises(NetEngineError, match="already holds an LMDB"):
        write_lmdb(tmp_path / "db", items)


@needs_lmdb
def test_lmdb_map_grows(tmp_path):
    value = b"\1" * 5000
    count = write_lmdb(tmp_path / "db", ((b"%08d" % i, value) for i in range(100)),
                                commit_every=30, map_size=1 << 16)
    stored = read_lmdb_items(tmp_path / "db")
    assert count == 100 and len(stored) == 100 and all(v == value for _, v in stored)


def test_lmdb_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(NetEngineError, match=r"pip install 'netengine\[lmdb\]'"):
        import_lmdb()


# -- Transformer ------------------------------------------------------------------------------------
def _param(text: str) -> caffe_pb2.TransformationParameter:
    from google.protobuf import text_format

    return text_format.Merge(text, caffe_pb2.TransformationParameter())


BATCH = np.random.default_rng(3).integers(0, 256, (4, 3, 6, 5)).astype(np.uint8)


def test_transform_scale_and_mean_value():
    rng = np.random.default_rng(0)
    out = Transformer(_param("scale: 0.5 mean_value: 1 mean_value: 2 mean_value: 3"),
                               caffe_pb2.TRAIN).apply(BATCH, rng, np.float64)
    expected = (BATCH.astype(np.float64) - np.array([1, 2, 3])[:, None, None]) * 0.5
    np.testing.assert_array_equal(out, expected)
    one = Transformer(_param("mean_value: 10"), caffe_pb2.TEST).apply(BATCH, rng)
    assert one.dtype == np.float32
    np.testing.assert_array_equal(one, BATCH.astype(np.float32) - 10)
    mnist = Transformer(_param("scale: 0.00390625"), caffe_pb2.TEST).apply(
        np.array([[[[255, 0]]]], np.uint8), rng)
    np.testing.assert_array_equal(mnist, [[[[0.99609375, 0.0]]]])


def test_transform_mean_file_is_taken_at_the_source_pixel():
    mean = np.random.default_rng(1).random((3, 6, 5)).astype(np.float32)
    t = Transformer(_param("crop_size: 3 scale: 2"), caffe_pb2.TEST, mean)
    out = t.apply(BATCH, np.random.default_rng(0), np.float64)
    full = (BATCH.astype(np.float64) - mean.astype(np.float64)) * 2
    np.testing.assert_allclose(out, full[:, :, 1:4, 1:4])


def test_transform_test_crop_is_centred():
    t = Transformer(_param("crop_size: 4"), caffe_pb2.TEST)
    assert t.output_shape((3, 6, 5)) == (3, 4, 4)
    out = t.apply(BATCH, np.random.default_rng(0))
    np.testing.assert_array_equal(out, BATCH[:, :, 1:5, 0:4])  # offsets (6-4)//2, (5-4)//2


def test_transform_train_crop_is_random_within_bounds():
    t = Transformer(_param("crop_size: 3"), caffe_pb2.TRAIN)
    batch = np.repeat(BATCH[:1], 64, axis=0)
    out = t.apply(batch, np.random.default_rng(5))
    offsets = set()
    for item in out:
        found = [(h, w) for h in range(4) for w in range(3)
                 if np.array_equal(item, batch[0, :, h:h + 3, w:w + 3])]
        assert found, "a TRAIN crop must be a window of the record"
        offsets.update(found)
    assert len(offsets) > 4  # offsets vary over the batch


def test_transform_mirror_is_a_coin_flip_in_both_phases():
    for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        t = Transformer(_param("mirror: true"), phase)
        batch = np.repeat(BATCH[:1], 32, axis=0)
        out = t.apply(batch, np.random.default_rng(2))
        flipped = [np.array_equal(o, batch[0, :, :, ::-1]) for o in out]
        kept = [np.array_equal(o, batch[0]) for o in out]
        assert all(f or k for f, k in zip(flipped, kept))
        assert 0 < sum(flipped) < 32
    # mirror with TEST centre crop: the crop is flipped
    t = Transformer(_param("mirror: true crop_size: 4"), caffe_pb2.TEST)
    out = t.apply(BATCH, np.random.default_rng(0))
    for o, b in zip(out, BATCH):
        assert np.array_equal(o, b[:, 1:5, 0:4]) or np.array_equal(o, b[:, 1:5, 0:4][:, :, ::-1])


def test_transform_is_repeatable_per_generator_seed():
    t = Transformer(_param("mirror: true crop_size: 3"), caffe_pb2.TRAIN)
    a = t.apply(BATCH, np.random.default_rng([1, 2]))
    b = t.apply(BATCH, np.random.default_rng([1, 2]))
    np.testing.assert_array_equal(a, b)


def test_transform_errors():
    with pytest.raises(NetEngineError, match="mean_file or mean_value, not both"):
        Transformer(_param('mean_file: "m" mean_value: 1'), caffe_pb2.TRAIN)
    with pytest.raises(NetEngineError, match="1 mean_value or one per channel"):
        Transformer(_param("mean_value: 1 mean_value: 2"),
                             caffe_pb2.TRAIN).output_shape((3, 4, 4))
    with pytest.raises(NetEngineError, match="crop_size 5 exceeds"):
        Transformer(_param("crop_size: 5"), caffe_pb2.TRAIN).output_shape((1, 4, 6))
    with pytest.raises(NetEngineError, match="the mean file has shape"):
        Transformer(_param(""), caffe_pb2.TRAIN,
                             np.zeros((1, 2, 2))).output_shape((1, 3, 3))


def test_read_mean_file(tmp_path):
    from netengine.formats.prototxt import write_binary_proto

    proto = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3)
    proto.data.extend([1, 2, 3, 4, 5, 6])
    write_binary_proto(tmp_path / "mean.binaryproto", proto)
    mean = read_mean_file(tmp_path / "mean.binaryproto")
    np.testing.assert_array_equal(mean, [[[1, 2, 3]], [[4, 5, 6]]])
    bad = caffe_pb2.BlobProto()
    bad.shape.dim.extend([2, 1, 1, 1])
    bad.data.extend([1, 2])
    write_binary_proto(tmp_path / "bad.binaryproto", bad)
    with pytest.raises(NetEngineError, match="one \\(1, C, H, W\\) image"):
        read_mean_file(tmp_path / "bad.binaryproto")


# -- tools/convert_mnist ----------------------------------------------------------------------------
def _small_mnist(folder: Path, n: int = 6) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx(folder / "s-images-idx3-ubyte", images)
    write_idx(folder / "s-labels-idx1-ubyte.gz", labels)
    return folder / "s-images-idx3-ubyte", folder / "s-labels-idx1-ubyte.gz", images, labels


@needs_lmdb
def test_convert_mnist_writes_caffes_layout(tmp_path, capsys):
    img, lab, images, labels = _small_mnist(tmp_path)
    db = tmp_path / "examples" / "mnist" / "mnist_train_lmdb"
    assert convert_mnist.main([str(img), str(lab), str(db), "--backend", "lmdb"]) == 0
    assert "A total of 6 items." in capsys.readouterr().out
    stored = read_lmdb_items(db)
    assert [k for k, _ in stored] == [b"%08d" % i for i in range(6)]
    for i, (_, value) in enumerate(stored):
        datum = caffe_pb2.Datum.FromString(value)
        assert (datum.channels, datum.height, datum.width) == (1, 28, 28)
        assert datum.data == images[i].tobytes() and datum.label == labels[i]
        assert not datum.encoded and not datum.float_data
    assert convert_mnist.main([str(img), str(lab), str(db)]) == 1
    assert "already holds an LMDB" in capsys.readouterr().err


def test_convert_mnist_to_leveldb(tmp_path, capsys):
    pytest.importorskip("plyvel")
    img, lab, images, labels = _small_mnist(tmp_path)
    db = tmp_path / "mnist_leveldb"
    assert convert_mnist.main([str(img), str(lab), str(db), "--backend", "leveldb"]) == 0
    assert "(LevelDB, keys %08d" in capsys.readouterr().out
    source = LevelDBSource(db)
    data, got = source.read(np.arange(len(labels)))
    np.testing.assert_array_equal(data[:, 0], images)
    np.testing.assert_array_equal(got, labels)
    source.close()


def test_convert_mnist_errors(tmp_path, capsys, monkeypatch):
    img, lab, _, _ = _small_mnist(tmp_path)
    monkeypatch.setitem(sys.modules, "plyvel", None)
    assert convert_mnist.main([str(img), str(lab), str(tmp_path / "db"), "--backend",
                               "leveldb"]) == 1
    err = capsys.readouterr().err
    assert "need the plyvel package" in err and err.count("\n") == 1
    monkeypatch.undo()
    write_idx(tmp_path / "few-labels-idx1-ubyte", np.zeros(2, np.uint8))
    assert convert_mnist.main([str(img), str(tmp_path / "few-labels-idx1-ubyte"),
                               str(tmp_path / "db2")]) == 1
    assert "holds 6 images but" in capsys.readouterr().err
    assert convert_mnist.main([str(tmp_path / "absent"), str(lab), str(tmp_path / "db3")]) == 1
    assert "file not found" in capsys.readouterr().err


# -- tools/get_mnist (checksums on local files; file:// mirrors stand in for the web) --------------
def _fake_specs(folder: Path) -> tuple[list, Path]:
    mirror = folder / "mirror"
    mirror.mkdir()
    specs = []
    for name, payload in (("a-idx3-ubyte.gz", b"images" * 100), ("b-idx1-ubyte.gz", b"labels")):
        data = gzip.compress(payload)
        (mirror / name).write_bytes(data)
        specs.append(get_mnist.FileSpec(name, len(data), hashlib.sha256(data).hexdigest(),
                                        hashlib.md5(data).hexdigest()))
    return specs, mirror


def test_get_mnist_table_is_the_published_one():
    assert [s.name for s in get_mnist.FILES] == [
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert sum(s.size for s in get_mnist.FILES) == 9912422 + 28881 + 1648877 + 4542
    assert all(len(s.sha256) == 64 and len(s.md5) == 32 for s in get_mnist.FILES)


def test_get_mnist_verify(tmp_path):
    specs, mirror = _fake_specs(tmp_path)
    good = mirror / specs[0].name
    assert get_mnist.verify(good, specs[0]) is None
    assert "is missing" in get_mnist.verify(tmp_path / "nope", specs[0])
    assert "bytes, expected" in get_mnist.verify(mirror / specs[1].name, specs[0])
    same_size = get_mnist.FileSpec(specs[0].name, specs[0].size, "0" * 64, specs[0].md5)
    assert "sha256" in get_mnist.verify(good, same_size)
    wrong_md5 = get_mnist.FileSpec(specs[0].name, specs[0].size, specs[0].sha256, "0" * 32)
    assert "md5" in get_mnist.verify(good, wrong_md5)


def test_get_mnist_fetch_from_local_mirrors(tmp_path, monkeypatch, capsys):
    specs, mirror = _fake_specs(tmp_path)
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    (bad / specs[0].name).write_bytes(b"tampered")
    monkeypatch.setattr(get_mnist, "FILES", tuple(specs))
    out = tmp_path / "out"
    # a mirror serving a wrong file is skipped; a missing one too; the good one is used
    assert get_mnist.main(["--dir", str(out), "--mirror", bad.as_uri(), "--mirror",
                           (tmp_path / "empty").as_uri(), "--mirror", mirror.as_uri(),
                           "--gunzip"]) == 0
    for spec in specs:
        assert get_mnist.verify(out / spec.name, spec) is None
    assert (out / "a-idx3-ubyte").read_bytes() == b"images" * 100
    assert not list(out.glob("*.part")) and not list(out.glob("*.tmp"))
    capsys.readouterr()
    # second run: nothing to download
    assert get_mnist.main(["--dir", str(out), "--mirror", (tmp_path / "empty").as_uri()]) == 0
    assert "already present" in capsys.readouterr().out


def test_get_mnist_offline_is_one_line(tmp_path, monkeypatch, capsys):
    specs, _ = _fake_specs(tmp_path)
    monkeypatch.setattr(get_mnist, "FILES", tuple(specs))
    assert get_mnist.main(["--dir", str(tmp_path / "out"), "--mirror",
                           (tmp_path / "no-such-mirror").as_uri()]) == 1
    err = capsys.readouterr().err
    assert err.startswith("get_mnist: error: cannot download a-idx3-ubyte.gz")
    assert "offline" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / specs[0].name).exists()


def test_tools_have_help():
    for module in (get_mnist, convert_mnist):
        with pytest.raises(SystemExit) as info:
            module.main(["--help"])
        assert info.value.code == 0
