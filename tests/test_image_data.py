"""ImageData (image list files) and WindowData (R-CNN window files); the image helpers."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import serve

from netengine import backend
from netengine.blob import Blob
from netengine.data.images import decode_image, read_image, resize_image
from netengine.errors import NetEngineError
from netengine.testing import TEST, TRAIN, make_layer

Image = pytest.importorskip("PIL.Image")

H, W = 6, 8


def tops(xp=np) -> list[Blob]:
    """Two float64 tops on ``xp`` (None: the current mode's array module)."""
    return [Blob((), dtype=np.float64, xp=xp) for _ in range(2)]


def save_rgb(path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path)


@pytest.fixture
def image_list(tmp_path):
    """5 random 6x8 RGB PNGs in tmp/img, labels 10..14, listed (relative to tmp) in list.txt.
    Returns (list path, the images as BGR (C, H, W))."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    bgr, lines = [], []
    for i in range(5):
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        save_rgb(tmp_path / "img" / f"im {i}.png", rgb)  # a space in the name
        bgr.append(rgb[:, :, ::-1].transpose(2, 0, 1))
        lines.append(f"img/im {i}.png {10 + i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "list.txt", np.stack(bgr)


def source_layer(kind, source, batch, extra, transform, phase, seed, xp, prefetch):
    """An ImageData or WindowData layer (``kind``) set up on two fresh tops."""
    backend.set_random_seed(seed)
    name, field = {"ImageData": ("images", "image_data_param"),
                   "WindowData": ("windows", "window_data_param")}[kind]
    layer = make_layer(f'name: "{name}" type: "{kind}" top: "data" top: "label" '
                       f'transform_param {{ {transform} }} data_param {{ prefetch: {prefetch} }} '
                       f'{field} {{ source: "{source}" batch_size: {batch} {extra} }}', phase)
    top = tops(xp)
    layer.setup([], top)
    return layer, top


def image_layer(source, batch=2, extra="", transform="", phase=TRAIN, seed=1701, xp=np,
                prefetch=0):
    return source_layer("ImageData", source, batch, extra, transform, phase, seed, xp, prefetch)


# -- helpers ---------------------------------------------------------------------------------------
def test_decode_image_bgr_and_gray(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # red
    rgb[1, 2] = (10, 200, 30)
    save_rgb(tmp_path / "a.png", rgb)
    bgr = decode_image(tmp_path / "a.png")
    assert bgr.shape == (3, 2, 3) and bgr.dtype == np.uint8
    np.testing.assert_array_equal(bgr[:, 0, 0], (0, 0, 255))
    np.testing.assert_array_equal(bgr[:, 1, 2], (30, 200, 10))
    gray = decode_image(tmp_path / "a.png", is_color=False)
    assert gray.shape == (1, 2, 3)
    luma = rgb.astype(float) @ [0.299, 0.587, 0.114]
    assert np.abs(gray[0] - luma).max() <= 1
    # a gray JPEG loads as 3 equal channels with is_color
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(tmp_path / "g.jpg", quality=100)
    color = decode_image(tmp_path / "g.jpg")
    assert color.shape == (3, 4, 4) and np.all(np.abs(color.astype(int) - 77) <= 1)


def test_resize_is_opencv_inter_linear():
    row = np.array([[[0, 100]]], np.uint8)
    np.testing.assert_array_equal(resize_image(row, 1, 4)[0, 0], [0, 25, 75, 100])
    image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 10
    np.testing.assert_array_equal(resize_image(image, 2, 2)[0],
                                  [[25, 45], [105, 125]])  # averages of 2x2 blocks
    assert resize_image(image, 4, 4) is image


def test_decode_errors(tmp_path):
    with pytest.raises(NetEngineError, match="image file not found: .*nope.png"):
        decode_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(NetEngineError, match="cannot decode image .*bad.png"):
        decode_image(tmp_path / "bad.png")


# -- ImageData ------------------------------------------------------------------------------------
def test_image_data_shapes_labels_bgr_and_wrap(image_list, xp):
    listing, images = image_list
    layer, top = image_layer(listing, batch=2, xp=xp)
    assert top[0].shape == (2, 3, H, W) and top[1].shape == (2,)
    batches = serve(layer, top, 4)
    for (data, labels), want in zip(batches, [[0, 1], [2, 3], [4, 0], [1, 2]]):
        np.testing.assert_array_equal(labels, np.array(want) + 10)
        np.testing.assert_array_equal(data, images[want])
    assert layer.batch_index == 4
    layer.close()


def test_image_data_gray_resize_scale_and_root_folder(image_list, tmp_path):
    listing, images = image_list
    names = [f"im {i}.png 0" for i in range(5)]
    (tmp_path / "bare.txt").write_text("\n".join(names))  # no final newline
    layer, top = image_layer(tmp_path / "bare.txt", batch=5, phase=TEST,
                             extra=f'is_color: false new_height: 3 new_width: 4 '
                                   f'root_folder: "{tmp_path / "img"}/"',
                             transform="scale: 0.5 mean_value: 10")
    assert top[0].shape == (5, 1, 3, 4)
    data, labels = serve(layer, top, 1)[0]
    gray = np.stack([decode_image(tmp_path / "img" / f"im {i}.png", False)
                     for i in range(5)])
    want = np.stack([resize_image(g, 3, 4) for g in gray])
    np.testing.assert_array_equal(data, (want - 10.0) * 0.5)
    np.testing.assert_array_equal(labels, np.zeros(5))
    layer.close()


def test_image_data_shuffle_is_seeded_reshuffled_and_seekable(image_list):
    listing, _ = image_list
    settings = dict(batch=5, extra="shuffle: true")
    a, ta = image_layer(listing, **settings)
    epochs = [lab for _, lab in serve(a, ta, 4)]
    for labels in epochs:
        assert sorted(labels) == [10, 11, 12, 13, 14]  # each epoch is a permutation
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled at the wrap
    b, tb = image_layer(listing, **settings)
    assert [lab.tolist() for _, lab in serve(b, tb, 4)] == [e.tolist() for e in epochs]
    c, tc = image_layer(listing, seed=99, **settings)
    assert [lab.tolist() for _, lab in serve(c, tc, 4)] != [e.tolist() for e in epochs]
    for layer in (a, b, c):
        layer.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_image_data_seek_gives_identical_batches(image_list, prefetch):
    listing, _ = image_list
    settings = dict(batch=3, extra="shuffle: true rand_skip: 4", prefetch=prefetch,
                    transform="mirror: true crop_size: 5 scale: 0.1")
    first, top = image_layer(listing, **settings)
    run = serve(first, top, 6)
    first.close()
    resumed, top2 = image_layer(listing, **settings)
    resumed.seek(3)
    for (d, lab), (d2, lab2) in zip(run[3:], serve(resumed, top2, 3)):
        np.testing.assert_array_equal(d, d2)
        np.testing.assert_array_equal(lab, lab2)
    assert any(not np.array_equal(run[0][0], b[0]) for b in run[1:])
    resumed.close()


def test_image_data_rand_skip_offsets_the_first_pass(image_list):
    listing, _ = image_list
    layer, top = image_layer(listing, batch=4, extra="rand_skip: 5", seed=5)
    (_, labels), = serve(layer, top, 1)
    np.testing.assert_array_equal(labels, (layer.skip + np.arange(4)) % 5 + 10)
    layer.close()


def test_image_data_crop_and_mirror(image_list):
    listing, images = image_list
    layer, top = image_layer(listing, batch=5, phase=TEST, transform="crop_size: 4")
    data, _ = serve(layer, top, 1)[0]
    np.testing.assert_array_equal(data, images[:, :, 1:5, 2:6])  # centre crop in TEST
    layer.close()
    layer, top = image_layer(listing, batch=5, phase=TRAIN, transform="mirror: true")
    flipped = set()
    for data, _ in serve(layer, top, 4):
        for i in range(5):
            same = np.array_equal(data[i], images[i])
            assert same or np.array_equal(data[i], images[i, :, :, ::-1])
            flipped.add(same)
    assert flipped == {True, False}
    layer.close()


def test_image_data_errors(image_list, tmp_path, monkeypatch):
    listing, _ = image_list
    with pytest.raises(NetEngineError) as info:
        image_layer(tmp_path / "missing.txt")
    message = str(info.value)
    assert "image_data_param.source not found" in message and "missing.txt" in message
    assert "(ImageData)" in message and "\n" not in message

    (tmp_path / "gone.txt").write_text("img/im 0.png 1\nimg/absent.png 2\n")
    layer, top = image_layer(tmp_path / "gone.txt", batch=1)
    layer.forward([], top)
    with pytest.raises(NetEngineError) as info:
        layer.forward([], top)
    message = str(info.value)
    assert "image file not found" in message and "absent.png" in message
    assert "line 2 of" in message and "\n" not in message
    (tmp_path / "first_gone.txt").write_text("absent.png 2\n")
    with pytest.raises(NetEngineError, match="image file not found.*absent.png"):
        image_layer(tmp_path / "first_gone.txt")

    (tmp_path / "label.txt").write_text("img/im 0.png cat\n")
    with pytest.raises(NetEngineError, match="line 1: expected 'path label'"):
        image_layer(tmp_path / "label.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(NetEngineError, match="lists no images"):
        image_layer(tmp_path / "empty.txt")
    with pytest.raises(NetEngineError, match="new_height and new_width together"):
        image_layer(listing, extra="new_height: 4")
    with pytest.raises(NetEngineError, match="crop_size 9 exceeds"):
        image_layer(listing, transform="crop_size: 9")

    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "img" / "small.png")
    (tmp_path / "sizes.txt").write_text("img/im 0.png 0\nimg/small.png 1\n")
    layer, top = image_layer(tmp_path / "sizes.txt", batch=2)
    with pytest.raises(NetEngineError, match="need one size .*new_height.*crop_size"):
        layer.forward([], top)
    # with a crop, images of different sizes are each cropped (TEST: their centres)
    layer, top = image_layer(tmp_path / "sizes.txt", batch=2, transform="crop_size: 3",
                             phase=TEST)
    layer.forward([], top)
    first = read_image(tmp_path / "img" / "im 0.png")
    np.testing.assert_array_equal(top[0].data[0], first[:, 1:4, 2:5])  # 6x8 → centre 3x3
    assert not top[0].data[1].any()  # the 3x3 black image, whole

    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(NetEngineError) as info:
        image_layer(listing)
    assert "pip install 'netengine[images]'" in str(info.value)
    assert "(ImageData)" in str(info.value)


# -- WindowData -----------------------------------------------------------------------------------
WINDOWS = """# 0
{a}
3
10
10
4
1 0.9 0 0 9 9
2 0.6 2 1 5 4
0 0.2 1 1 3 3
5 0.4 0 0 4 4
# 1
{b}
3
10
10
2
3 0.8 1 2 6 7
0 0.0 0 0 9 9
"""


@pytest.fixture
def window_file(tmp_path):
    """Two 10x10 images: a (column index·20 in every channel), b random; a window file."""
    a = np.broadcast_to((np.arange(10, dtype=np.uint8) * 20)[None, :, None], (10, 10, 3))
    b = np.random.default_rng(1).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    save_rgb(tmp_path / "a.png", np.ascontiguousarray(a))
    save_rgb(tmp_path / "b.png", b)
    (tmp_path / "windows.txt").write_text(WINDOWS.format(a="a.png", b="b.png"))
    return tmp_path / "windows.txt", a[:, :, ::-1].transpose(2, 0, 1), b[:, :, ::-1].transpose(
        2, 0, 1)


def window_layer(source, batch=8, extra="", transform="crop_size: 4", seed=3, prefetch=0,
                 xp=np):
    return source_layer("WindowData", source, batch, extra, transform, TRAIN, seed, xp, prefetch)


def test_window_data_shapes_and_fg_bg_proportions(window_file):
    source, _, _ = window_file
    layer, top = window_layer(source, batch=8)
    assert top[0].shape == (8, 3, 4, 4) and top[1].shape == (8,)
    for _, labels in serve(layer, top, 3):
        np.testing.assert_array_equal(labels[:6], 0)  # background first
        assert set(labels[6:]) <= {1, 2, 3} and all(labels[6:] > 0)
    layer.close()
    layer, top = window_layer(source, batch=10, extra="fg_fraction: 0.5 fg_threshold: 0.7")
    seen = set()
    for _, labels in serve(layer, top, 6):
        assert (labels == 0).sum() == 5
        seen |= set(labels[5:].tolist())
    assert seen == {1, 3}  # overlap 0.6 is neither fg (< 0.7) nor bg (>= 0.5)
    layer.close()


def test_window_data_warp_crop_mean_and_scale(window_file, tmp_path):
    source, a, b = window_file
    (tmp_path / "one.txt").write_text("# 0\nb.png\n3\n10\n10\n1\n4 1.0 2 1 5 4\n")
    layer, top = window_layer(tmp_path / "one.txt", batch=2, extra="fg_fraction: 1",
                              transform="crop_size: 4 mean_value: 1 mean_value: 2 "
                                        "mean_value: 3 scale: 0.5")
    data, labels = serve(layer, top, 1)[0]
    np.testing.assert_array_equal(labels, [4, 4])
    want = (b[:, 1:5, 2:6] - np.array([1.0, 2, 3])[:, None, None]) * 0.5
    np.testing.assert_array_equal(data[0], want)  # a 4x4 window warped to 4x4: its pixels
    layer.close()


def test_window_data_context_pad_and_mirror(window_file, tmp_path):
    source, a, _ = window_file
    (tmp_path / "one.txt").write_text("# 0\na.png\n3\n10\n10\n1\n1 1.0 0 0 9 9\n")
    layer, top = window_layer(tmp_path / "one.txt", batch=16, extra="fg_fraction: 1 "
                              "context_pad: 1", transform="crop_size: 6 mirror: true")
    data, _ = serve(layer, top, 1)[0]
    # box grown by 6/4 about its centre: x in [-3, 13] (17 px → 6), clipped part 0..9 warps to
    # round(10·6/17) = 4 columns after round(3·6/17) = 1 (left) or round(4·6/17) = 1 (right)
    # padding columns; rows likewise. The padding stays 0.
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    orders = set()
    for item in data:
        assert np.all(item[:, ~mask] == 0)
        inside = item[0][mask].reshape(4, 4)
        assert np.all(inside > 0)
        orders.add(bool(inside[0, 0] < inside[0, -1]))  # column ramp: mirrored or not
        np.testing.assert_array_equal(item[0], item[1])
    assert orders == {True, False}
    layer.close()


def test_window_data_square_mode_and_mean_file(window_file, tmp_path):
    from netengine.formats.prototxt import write_binary_proto
    from netengine.proto import caffe_pb2

    _, _, b = window_file
    mean = np.full((1, 3, 6, 6), 5.0, np.float32)
    mean[0, :, 1:5, 1:5] = 7  # the centred 4x4 region is what gets subtracted
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend(mean.shape)
    proto.data.extend(mean.ravel().tolist())
    write_binary_proto(tmp_path / "mean.binaryproto", proto)
    (tmp_path / "wide.txt").write_text("# 0\nb.png\n3\n10\n10\n1\n2 1.0 0 3 9 5\n")
    layer, top = window_layer(tmp_path / "wide.txt", batch=2, extra="crop_mode: 'square' "
                              "fg_fraction: 1", transform=f'crop_size: 4 mean_file: '
                              f'"{tmp_path / "mean.binaryproto"}"')
    data, labels = serve(layer, top, 1)[0]
    # the 10x3 box becomes 10x10 about its centre (4.5 rows down): x in [0, 10], y in [-1, 10]
    # (11 x 12 px → 4x4); clipped to the image: 10x10 px → round(10·4/11) = 4 columns and
    # round(10·4/12) = 3 rows, top pad round(1·4/12) = 0, left pad 0; the last row stays 0.
    want = np.zeros((3, 4, 4))
    want[:, :3] = resize_image(b, 3, 4) - 7.0
    np.testing.assert_array_equal(data[0], want)
    np.testing.assert_array_equal(labels, [2, 2])
    layer.close()


def test_window_data_seek_and_cache_agree(window_file):
    source, _, _ = window_file
    settings = dict(batch=6, extra="context_pad: 1", transform="crop_size: 5 mirror: true")
    first, top = window_layer(source, prefetch=2, **settings)
    run = serve(first, top, 4)
    first.close()
    cached, top2 = window_layer(source, **settings | {"extra": "context_pad: 1 "
                                                                "cache_images: true"})
    cached.seek(2)
    for (d, lab), (d2, lab2) in zip(run[2:], serve(cached, top2, 2)):
        np.testing.assert_array_equal(d, d2)
        np.testing.assert_array_equal(lab, lab2)
    cached.close()


def test_window_data_errors(window_file, tmp_path):
    source, _, _ = window_file
    with pytest.raises(NetEngineError) as info:
        window_layer(tmp_path / "nowhere.txt")
    message = str(info.value)
    assert "window_data_param.source not found" in message and "nowhere.txt" in message
    assert "(WindowData)" in message and "\n" not in message
    with pytest.raises(NetEngineError, match="crop_size > 0"):
        window_layer(source, transform="")
    with pytest.raises(NetEngineError, match="crop_mode must be 'warp' or 'square'"):
        window_layer(source, extra="crop_mode: 'round'")
    with pytest.raises(NetEngineError, match="no foreground windows"):
        window_layer(source, extra="fg_threshold: 0.95")
    with pytest.raises(NetEngineError, match="context_pad 2 leaves nothing"):
        window_layer(source, extra="context_pad: 2")
    (tmp_path / "bad.txt").write_text("# 0\na.png\n3\n10\n10\n2\n1 0.9 0 0 9 9\n")
    with pytest.raises(NetEngineError, match="file ends before its 2 windows"):
        window_layer(tmp_path / "bad.txt")
    (tmp_path / "zero.txt").write_text("# 0\na.png\n3\n10\n10\n1\n0 0.9 0 0 9 9\n")
    with pytest.raises(NetEngineError, match="foreground classes must be > 0"):
        window_layer(tmp_path / "zero.txt")
    (tmp_path / "hash.txt").write_text("0 a.png\n")
    with pytest.raises(NetEngineError, match="expected '# <index>'"):
        window_layer(tmp_path / "hash.txt")
    (tmp_path / "gone.txt").write_text(WINDOWS.format(a="a.png", b="absent.png"))
    with pytest.raises(NetEngineError, match="image file not found.*absent.png"):
        window_layer(tmp_path / "gone.txt", extra="cache_images: true")
    layer, top = window_layer(tmp_path / "gone.txt", batch=40, extra="fg_fraction: 0.5")
    with pytest.raises(NetEngineError) as info:
        layer.forward([], top)
    assert "absent.png" in str(info.value) and "(WindowData)" in str(info.value)


def test_image_readers_feed_device_blobs(image_list, window_file, monkeypatch):
    """In GPU mode (fake_cupy: CuPy's rules on the CPU) both readers fill device tops with
    the values CPU mode gives."""
    import fake_cupy

    monkeypatch.setattr(backend, "_import_cupy", lambda: fake_cupy.cupy)
    listing, _ = image_list
    source, _, _ = window_file
    makers = [lambda: image_layer(listing, transform="mirror: true crop_size: 5", prefetch=2,
                                  xp=None),
              lambda: window_layer(source, extra="context_pad: 1", transform="crop_size: 5",
                                   xp=None)]
    try:
        for make in makers:
            results = []
            for device in (False, True):
                if device:
                    backend.set_mode_gpu()
                layer, top = make()
                layer.forward([], top)
                assert isinstance(top[0].data, fake_cupy.cupy.ndarray if device else np.ndarray)
                results.append([t.host_data() for t in top])
                layer.close()
                backend.set_mode_cpu()
            for a, b in zip(*results):
                np.testing.assert_array_equal(a, b)
    finally:
        backend.set_mode_cpu()
