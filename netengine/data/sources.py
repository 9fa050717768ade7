"""Datasets on disk: MNIST's IDX files, Caffe's LMDB of Datum records, and transform_param.

* IDX (MNIST's own format): ``read_idx`` / ``write_idx``; a ``.gz`` file is read transparently
  (recognised by its magic bytes, whatever its name) and written when the name ends in ``.gz``.
  Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
  0x0D float32, 0x0E float64), the number of axes, then each axis as a big-endian uint32;
  the values follow in C order, big-endian.
* LMDB (Caffe's ``convert_mnist_data`` layout): a directory holding ``data.mdb``; keys are
  ``%08d`` record indices, values serialized ``Datum`` messages (channels, height, width,
  ``data`` bytes of uint8 pixels in C×H×W order or ``float_data``, integer ``label``).
  Needs the optional ``lmdb`` package (``pip install 'netengine[lmdb]'``).
* ``Transformer``: Caffe's DataTransformer for a whole batch, ``y = (x - mean) * scale`` then
  crop (TRAIN: random offset, TEST: centre) and mirror (a coin flip per image in both phases);
  the mean is taken at the source pixel, so crop/mirror commute with it as in Caffe.
* Images (ImageData, WindowData): ``decode_image`` / ``read_image`` load a file as OpenCV's
  imread does (uint8, BGR or gray) with Pillow (``pip install 'netengine[images]'``);
  ``resize_image`` is OpenCV's bilinear INTER_LINEAR resize.

A record source (``IDXSource``, ``LMDBSource``, ``LevelDBSource``, ``ArraySource``) has a
length, a per-record shape (C, H, W) and ``read(indices) -> (images, labels)``; the Data layer
serves batches from it.
"""
from __future__ import annotations

import gzip
import io as _io
import os
import re
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from netengine.errors import NetEngineError
from netengine.proto import caffe_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]

# Folders searched, after the current directory, for a relative data source. The Net/Solver
# may append the prototxt's or solver's folder (``add_search_dir``).
SEARCH_DIRS: list[Path] = [REPO_ROOT]

_GZIP_MAGIC = b"\x1f\x8b"
IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
             0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


# -- paths ----------------------------------------------------------------------------------------
def add_search_dir(path: str | os.PathLike) -> None:
    """Also look for relative data sources in ``path`` (after the current directory)."""
    folder = Path(path).resolve()
    if folder not in SEARCH_DIRS:
        # before the repository root, which stays the last resort
        at = SEARCH_DIRS.index(REPO_ROOT) if REPO_ROOT in SEARCH_DIRS else len(SEARCH_DIRS)
        SEARCH_DIRS.insert(at, folder)


def _gz_variants(path: Path) -> list[Path]:
    """``path`` itself, then the same name with ``.gz`` added or removed."""
    if path.name.endswith(".gz"):
        return [path, path.with_name(path.name[:-3])]
    return [path, path.with_name(path.name + ".gz")]


def resolve_source(path: str | os.PathLike, extra_dirs: Sequence[str | os.PathLike] = (),
                   gz: bool = True) -> Path | None:
    """The existing file or folder a data source names, or None.

    Absolute paths are taken as they are; relative ones are tried against the current
    directory first (Caffe's rule), then ``extra_dirs``, then ``SEARCH_DIRS`` (the repository
    root by default). With ``gz``, ``X`` also finds ``X.gz`` and ``X.gz`` also finds ``X``.
    """
    path = Path(os.path.expanduser(str(path)))
    bases = [Path()] if path.is_absolute() else [Path.cwd(), *map(Path, extra_dirs),
                                                 *SEARCH_DIRS]
    for base in bases:
        for candidate in (_gz_variants(base / path) if gz else [base / path]):
            if candidate.exists():
                return candidate
    return None


def search_description(path: str | os.PathLike, extra_dirs: Sequence = ()) -> str:
    """Where ``resolve_source`` looked, for an error message."""
    if Path(path).is_absolute():
        return str(path)
    places = [str(Path.cwd()), *map(str, extra_dirs), *map(str, SEARCH_DIRS)]
    return f"{path} (looked in {', '.join(dict.fromkeys(places))})"


def is_idx_images(path: str | os.PathLike) -> bool:
    """True for an MNIST-style images file name (``...-idx3-ubyte`` or ``...idx3-ubyte.gz``)."""
    return re.search(r"idx3-ubyte(\.gz)?$", Path(path).name) is not None


def idx_labels_path(images: str | os.PathLike) -> Path | None:
    """The labels file beside an IDX images file (idx3 → idx1, images → labels), or None."""
    images = Path(images)
    name = images.name.replace("idx3-ubyte", "idx1-ubyte")
    renamed = re.sub(r"images(?!.*images)", "labels", name)
    for candidate_name in dict.fromkeys([renamed, name]):
        if candidate_name == images.name:
            continue
        for candidate in _gz_variants(images.with_name(candidate_name)):
            if candidate.exists():
                return candidate
    return None


# -- IDX ------------------------------------------------------------------------------------------
def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, gunzipped when it is a gzip stream."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise NetEngineError(f"file not found: {path}") from None
    except OSError as err:
        raise NetEngineError(f"cannot read {path}: {err.strerror or err}") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise NetEngineError(f"{path}: corrupt gzip data ({err})") from None
    return data


def parse_idx(data: bytes, where: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes into an array (native byte order)."""
    if len(data) < 4 or data[0] or data[1]:
        raise NetEngineError(f"{where}: not an IDX file (expected 2 zero bytes, a type code "
                             f"and an axis count at the start)")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        raise NetEngineError(f"{where}: unknown IDX type code 0x{code:02X} (expected one of "
                             + ", ".join(f"0x{c:02X}" for c in IDX_TYPES) + ")")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise NetEngineError(f"{where}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_TYPES[code]
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header < need:
        raise NetEngineError(f"{where}: truncated IDX file: shape {shape} needs {need} bytes "
                             f"of values, found {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, count=need // dtype.itemsize, offset=header)
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array an IDX file (plain or gzipped) holds."""
    return parse_idx(read_bytes(path), str(path))


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of ``array`` (uint8, int8, int16, int32, float32 or float64)."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("=")
    if dtype not in _IDX_CODES:
        raise NetEngineError(f"IDX cannot hold {array.dtype} values (uint8, int8, int16, int32, "
                             "float32 or float64)")
    if array.ndim > 255:
        raise NetEngineError("IDX holds at most 255 axes")
    header = bytes([0, 0, _IDX_CODES[dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype.newbyteorder(">")).tobytes()


def gzip_bytes(data: bytes) -> bytes:
    """Reproducible gzip (no file name, mtime 0): the same input always gives the same bytes."""
    buffer = _io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9,
                       mtime=0) as stream:
        stream.write(data)
    return buffer.getvalue()


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as IDX (atomically); gzipped when ``compress`` or the name ends .gz."""
    from netengine.formats.prototxt import write_atomic

    data = idx_bytes(array)
    if compress or (compress is None and str(path).endswith(".gz")):
        data = gzip_bytes(data)
    write_atomic(path, data)


# -- Datum ----------------------------------------------------------------------------------------
def array_to_datum(image: np.ndarray, label: int = 0) -> caffe_pb2.Datum:
    """A Datum from a (C, H, W) or (H, W) image: uint8 → ``data`` bytes, else ``float_data``."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise NetEngineError(f"a Datum holds a (C, H, W) image, got shape {image.shape}")
    datum = caffe_pb2.Datum(channels=image.shape[0], height=image.shape[1],
                            width=image.shape[2], label=int(label))
    if image.dtype == np.uint8:
        datum.data = np.ascontiguousarray(image).tobytes()
    else:
        datum.float_data.extend(image.astype(np.float32).ravel().tolist())
    return datum


def datum_to_array(datum: caffe_pb2.Datum, color: bool | None = None) -> tuple[np.ndarray, int]:
    """(C, H, W) image (uint8 for byte data, float32 for float_data) and the label.

    Encoded records (PNG/JPEG bytes, ``convert_imageset --encoded``) are decoded as Caffe's
    DecodeDatumToCVMat does: ``color`` True → 3 channels BGR (force_color), False → 1 gray
    channel (force_gray), None → the image's own channels (gray stays gray).
    """
    shape = (datum.channels, datum.height, datum.width)
    if datum.encoded:
        return decode_image(datum.data, color, name="encoded Datum"), datum.label
    count = int(np.prod(shape))
    if datum.data:
        if len(datum.data) != count:
            raise NetEngineError(f"Datum of shape {shape} holds {len(datum.data)} bytes, "
                                 f"expected {count}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape), datum.label
    if len(datum.float_data) != count:
        raise NetEngineError(f"Datum of shape {shape} holds {len(datum.float_data)} float "
                             f"values, expected {count}")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape), datum.label


def decode_datum(value: bytes, color: bool | None = None) -> tuple[np.ndarray, int]:
    try:
        datum = caffe_pb2.Datum.FromString(value)
    except Exception as err:  # protobuf's DecodeError
        raise NetEngineError(f"not a serialized Datum ({len(value)} bytes): {err}") from None
    return datum_to_array(datum, color)


# -- LMDB -----------------------------------------------------------------------------------------
def import_lmdb():
    """The ``lmdb`` module, or a one-line error saying how to install it."""
    try:
        import lmdb
    except ImportError:
        raise NetEngineError("LMDB datasets need the lmdb package: pip install 'netengine[lmdb]' "
                             "(or pip install lmdb)") from None
    return lmdb


def lmdb_key(index: int) -> bytes:
    """Caffe's convert_mnist_data key: the record index as 8 zero-padded digits."""
    return b"%08d" % index


def write_lmdb(path: str | os.PathLike, items: Iterable[tuple[bytes, bytes]],
               commit_every: int = 1000, map_size: int = 64 << 20) -> int:
    """Write (key, value) pairs into a new LMDB folder ``path``; returns the record count.

    Refuses an existing database (as Caffe's convert tools do). The map grows as needed.
    """
    lmdb = import_lmdb()
    path = Path(path)
    if (path / "data.mdb").exists():
        raise NetEngineError(f"{path} already holds an LMDB database; remove it first")
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=map_size, subdir=True, meminit=False)
    count = 0
    try:
        pending: list[tuple[bytes, bytes]] = []

        def flush() -> None:
            nonlocal map_size
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in pending:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    map_size *= 2
                    env.set_mapsize(map_size)
            pending.clear()

        for key, value in items:
            pending.append((key, value))
            count += 1
            if len(pending) >= commit_every:
                flush()
        flush()
        env.sync()
    finally:
        env.close()
    return count


def is_lmdb(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "data.mdb").is_file() or (path.is_file() and path.suffix == ".mdb")


def is_leveldb(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "CURRENT").is_file() and not is_lmdb(path)


def read_lmdb_items(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an LMDB, in key order (for tests and small databases)."""
    lmdb = import_lmdb()
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=Path(path).is_dir())
    try:
        with env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    finally:
        env.close()


# -- record sources -------------------------------------------------------------------------------
class ArraySource:
    """Records held in memory: images (N, C, H, W), labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 name: str = "arrays") -> None:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4:
            raise NetEngineError(f"{name}: expected images of shape (N, C, H, W) or (N, H, W), "
                                 f"got {images.shape}")
        if labels is None:
            labels = np.zeros(len(images), dtype=np.int64)
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images):
            raise NetEngineError(f"{name}: {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise NetEngineError(f"{name}: holds no records")
        self.images, self.labels, self.name = images, labels, name

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    def close(self) -> None:
        pass


class IDXSource(ArraySource):
    """An MNIST images file (…-idx3-ubyte[.gz]) with its labels file (…-idx1-ubyte[.gz]) beside
    it; without a labels file every label is 0."""

    def __init__(self, images_path: str | os.PathLike,
                 labels_path: str | os.PathLike | None = None) -> None:
        images = read_idx(images_path)
        if images.ndim not in (3, 4):
            raise NetEngineError(f"{images_path}: expected IDX images of shape (N, H, W) or "
                                 f"(N, C, H, W), got {images.shape}")
        labels_path = labels_path or idx_labels_path(images_path)
        labels = None
        if labels_path is not None:
            labels = read_idx(labels_path)
            if labels.ndim != 1:
                raise NetEngineError(f"{labels_path}: expected 1-D IDX labels, got shape "
                                     f"{labels.shape}")
            if len(labels) != len(images):
                raise NetEngineError(f"{labels_path} holds {len(labels)} labels but "
                                     f"{images_path} holds {len(images)} images")
        super().__init__(images, labels, str(images_path))
        self.labels_path = labels_path


_HANDLES: dict[tuple[str, str], list] = {}  # (kind, realpath) -> [handle, number of users]
_HANDLES_LOCK = threading.Lock()


def _shared_handle(kind: str, path, opener):
    """One read handle per database and process: LMDB and LevelDB refuse a second open, and a
    train net and a test net (or two test nets) may read the same database."""
    key = (kind, os.path.realpath(path))
    with _HANDLES_LOCK:
        entry = _HANDLES.get(key)
        if entry is None:
            entry = _HANDLES[key] = [opener(), 0]
        entry[1] += 1
        return entry[0]


def _release_handle(handle) -> None:
    with _HANDLES_LOCK:
        for key, entry in list(_HANDLES.items()):
            if entry[0] is handle:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _HANDLES[key]
                    handle.close()
                return


class _DatumDB:
    """Caffe's key-value database of Datum records, served by index in key order (thread-safe
    reads). Subclasses open the database and fetch keys and values."""

    kind = ""

    def __init__(self, path: str | os.PathLike, color: bool | None = None,
                 ragged: bool = False) -> None:
        self.name = str(path)
        self.color = color  # for encoded records: force_color / force_gray / native
        self.ragged = ragged  # records may differ in size (they are cropped to one)
        self.handle = _shared_handle(self.kind, path, lambda: self._open(path))
        self.keys = self._keys()
        if not self.keys:
            raise NetEngineError(f"{self.kind} {path} holds no records")
        first, _ = decode_datum(self._values(self.keys[:1])[0], color)
        self._shape = first.shape

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = [self.keys[int(i)] for i in np.asarray(indices).ravel()]
        images, labels = [], []
        for key, value in zip(keys, self._values(keys)):
            try:
                image, label = decode_datum(value, self.color)
            except NetEngineError as err:
                raise NetEngineError(f"{self.name}: record {key!r}: {err}") from None
            if image.shape != self._shape and not (
                    self.ragged and image.shape[0] == self._shape[0]):
                raise NetEngineError(f"{self.name}: record {key!r} has shape {image.shape}, "
                                     f"the first record {self._shape}; without "
                                     "transform_param.crop_size (or batch_size 1) a Data layer "
                                     "needs records of one shape")
            images.append(image)
            labels.append(label)
        if any(image.shape != images[0].shape for image in images):
            return images, np.asarray(labels)  # a list: Transformer.apply crops each
        return np.stack(images), np.asarray(labels)

    def close(self) -> None:
        if self.handle is not None:
            _release_handle(self.handle)
            self.handle = None


class LMDBSource(_DatumDB):
    """An LMDB folder (``data.mdb``) of Datum records."""

    kind = "LMDB"

    def _open(self, path):
        lmdb = import_lmdb()
        try:
            return lmdb.open(str(path), readonly=True, lock=False, readahead=False,
                             subdir=Path(path).is_dir(), max_readers=256)
        except lmdb.Error as err:
            raise NetEngineError(f"cannot open LMDB {path}: {err}") from None

    def _keys(self) -> list[bytes]:
        with self.handle.begin() as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

    def _values(self, keys: list[bytes]) -> list[bytes]:
        with self.handle.begin(buffers=False) as txn:
            return [txn.get(key) for key in keys]


def import_plyvel():
    """The ``plyvel`` LevelDB binding, or a one-line error saying how to install it."""
    try:
        import plyvel
    except ImportError:
        raise NetEngineError("LEVELDB databases need the plyvel package: pip install "
                             "'netengine[leveldb]' (or pip install plyvel), or convert the "
                             "data to LMDB and set data_param.backend: LMDB") from None
    return plyvel


class LevelDBSource(_DatumDB):
    """A LevelDB folder (``CURRENT``, ``*.ldb``) of Datum records, Caffe's default backend."""

    kind = "LevelDB"

    def _open(self, path):
        plyvel = import_plyvel()
        try:
            return plyvel.DB(str(path), create_if_missing=False)
        except Exception as err:  # plyvel.Error, IOError (the folder is locked by a writer)
            raise NetEngineError(f"cannot open LevelDB {path}: {err}") from None

    def _keys(self) -> list[bytes]:
        return [bytes(k) for k in self.handle.iterator(include_value=False)]

    def _values(self, keys: list[bytes]) -> list[bytes]:
        return [self.handle.get(key) for key in keys]


def write_leveldb(path: str | os.PathLike, items: Iterable[tuple[bytes, bytes]]) -> int:
    """Write (key, value) pairs into a new LevelDB folder ``path``; returns the record count.
    Refuses an existing database (as Caffe's convert tools do)."""
    plyvel = import_plyvel()
    path = Path(path)
    if (path / "CURRENT").exists():
        raise NetEngineError(f"{path} already holds a LevelDB database; remove it first")
    db = plyvel.DB(str(path), create_if_missing=True, error_if_exists=True)
    count = 0
    try:
        with db.write_batch() as batch:
            for key, value in items:
                batch.put(key, value)
                count += 1
    finally:
        db.close()
    return count


# -- transform_param ------------------------------------------------------------------------------
def read_mean_file(path: str | os.PathLike) -> np.ndarray:
    """A mean image from a binaryproto BlobProto, as a (C, H, W) float32 array."""
    from netengine.formats.prototxt import read_binary_proto
    from netengine.net import blob_from_proto

    try:
        array = blob_from_proto(read_binary_proto(path, caffe_pb2.BlobProto()))
    except NetEngineError as err:
        raise NetEngineError(f"mean file {path}: {err.message}") from None
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise NetEngineError(f"{path}: a mean file holds one (1, C, H, W) image, got shape "
                             f"{array.shape}")
    return array


class Transformer:
    """Caffe's DataTransformer over a batch: ``(x - mean) * scale``, crop, mirror.

    ``param`` is a TransformationParameter; ``mean`` a (C, H, W) array from mean_file (None:
    use mean_value, if any). Randomness (mirror coins, TRAIN crop offsets) comes from the
    generator given to ``apply``, so a caller that seeds it per batch gets repeatable batches.
    """

    def __init__(self, param: caffe_pb2.TransformationParameter, phase: int,
                 mean: np.ndarray | None = None) -> None:
        if param.HasField("mean_file") and len(param.mean_value):
            raise NetEngineError("transform_param: give mean_file or mean_value, not both")
        self.param, self.phase = param, phase
        self.scale = param.scale
        self.crop = param.crop_size
        self.mirror = param.mirror
        self.mean_file = mean
        self.mean_value = np.asarray(param.mean_value, dtype=np.float32)

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of a transformed record of input ``shape``; checks the mean and crop."""
        channels, height, width = shape
        if self.mean_file is not None and tuple(self.mean_file.shape) != tuple(shape):
            named = f" {self.param.mean_file}" if self.param.mean_file else ""
            raise NetEngineError(f"transform_param: the mean file{named} has "
                                 f"shape {tuple(self.mean_file.shape)}, the records' is "
                                 f"{tuple(shape)}")
        if len(self.mean_value) not in (0, 1, channels):
            raise NetEngineError(f"transform_param: give 1 mean_value or one per channel "
                                 f"({channels}), got {len(self.mean_value)}")
        if self.crop:
            if self.crop > height or self.crop > width:
                raise NetEngineError(f"transform_param: crop_size {self.crop} exceeds the "
                                     f"records' {height}x{width}")
            return channels, self.crop, self.crop
        return channels, height, width

    def apply(self, batch: np.ndarray, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
        """Transform (N, C, H, W) records into a new (N, C, h, w) array of ``dtype`` (host).
        ``batch`` may also be a list of (C, H_i, W_i) records of different sizes when a crop
        is set: each is cropped (as Caffe transforms each datum by itself)."""
        if isinstance(batch, list):
            return self._apply_ragged(batch, rng, dtype)
        n, channels, height, width = batch.shape
        out_c, out_h, out_w = self.output_shape(batch.shape[1:])
        # Draw order per batch: mirror coins, then TRAIN crop offsets (rows, then columns).
        flips = rng.integers(0, 2, size=n).astype(bool) if self.mirror else None
        x = batch.astype(dtype, copy=True)
        if self.mean_file is not None:
            x -= self.mean_file.astype(dtype)
        elif len(self.mean_value):
            x -= self.mean_value.astype(dtype).reshape(-1, 1, 1)
        if self.scale != 1:
            x *= x.dtype.type(self.scale)
        if not self.crop and flips is None:
            return x
        if self.crop and self.phase == caffe_pb2.TRAIN:
            h_off = rng.integers(0, height - out_h + 1, size=n)
            w_off = rng.integers(0, width - out_w + 1, size=n)
        else:
            h_off = np.full(n, (height - out_h) // 2)
            w_off = np.full(n, (width - out_w) // 2)
        rows = h_off[:, None] + np.arange(out_h)
        cols = w_off[:, None] + np.arange(out_w)
        if flips is not None:
            cols = np.where(flips[:, None], cols[:, ::-1], cols)
        items = np.arange(n)[:, None, None, None]
        chans = np.arange(out_c)[None, :, None, None]
        return x[items, chans, rows[:, None, :, None], cols[:, None, None, :]]

    def _apply_ragged(self, records: list, rng: np.random.Generator, dtype) -> np.ndarray:
        """Records of different sizes, each cropped to crop_size (same draw order as
        ``apply``: the mirror coins, then row offsets, then column offsets)."""
        n, crop = len(records), self.crop
        if not crop:
            raise NetEngineError("records of different sizes need transform_param.crop_size")
        for record in records:
            self.output_shape(record.shape)  # mean and crop checks, per record
        flips = rng.integers(0, 2, size=n).astype(bool) if self.mirror else np.zeros(n, bool)
        heights = np.array([r.shape[1] for r in records])
        widths = np.array([r.shape[2] for r in records])
        if self.phase == caffe_pb2.TRAIN:
            h_off = rng.integers(0, heights - crop + 1)
            w_off = rng.integers(0, widths - crop + 1)
        else:
            h_off, w_off = (heights - crop) // 2, (widths - crop) // 2
        out = np.empty((n, records[0].shape[0], crop, crop), dtype=dtype)
        for i, record in enumerate(records):
            x = record[:, h_off[i]:h_off[i] + crop, w_off[i]:w_off[i] + crop].astype(dtype)
            if self.mean_file is not None:
                x -= self.mean_file[:, h_off[i]:h_off[i] + crop,
                                    w_off[i]:w_off[i] + crop].astype(dtype)
            elif len(self.mean_value):
                x -= self.mean_value.astype(dtype).reshape(-1, 1, 1)
            if self.scale != 1:
                x *= x.dtype.type(self.scale)
            out[i] = x[:, :, ::-1] if flips[i] else x
        return out


# -- images (ImageData, WindowData) ---------------------------------------------------------------
def import_pillow():
    """Pillow's ``Image`` module, or a one-line error saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise NetEngineError("reading images needs the Pillow package: "
                             "pip install 'netengine[images]' (or pip install pillow)") from None
    return Image


def decode_image(data: bytes | str | os.PathLike, is_color: bool | None = True,
                 name: str | None = None) -> np.ndarray:
    """An image file (path or its bytes) as uint8 (C, H, W), the way OpenCV's imread loads it.

    ``is_color``: 3 channels in **BGR** order (gray images are replicated, alpha dropped);
    False: 1 channel of luma (0.299 R + 0.587 G + 0.114 B); None: as stored (gray stays
    gray, Caffe's native decode of an encoded Datum). Needs Pillow.
    """
    image_module = import_pillow()
    name = name or (str(data) if not isinstance(data, bytes) else "image")
    if not isinstance(data, bytes):
        try:
            data = Path(data).read_bytes()
        except FileNotFoundError:
            raise NetEngineError(f"image file not found: {name}") from None
        except OSError as err:
            raise NetEngineError(f"cannot read image {name}: {err.strerror or err}") from None
    try:
        with image_module.open(_io.BytesIO(data)) as image:
            if is_color is None:
                is_color = image.mode not in _GRAY_MODES
            image = _as_8bit(_upright(image))
            pixels = np.asarray(image.convert("RGB" if is_color else "L"), dtype=np.uint8)
    except Exception as err:  # Pillow's UnidentifiedImageError, OSError, ValueError ...
        reason = ("not an image format Pillow can read"
                  if type(err).__name__ == "UnidentifiedImageError" else str(err))
        raise NetEngineError(f"cannot decode image {name}: {reason}") from None
    if is_color:
        return np.ascontiguousarray(pixels[:, :, ::-1].transpose(2, 0, 1))
    return pixels[None]


_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _upright(image):
    """The image turned as its EXIF orientation says (OpenCV's imread does so since 3.1)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def _as_8bit(image):
    """16/32-bit single-channel images reduced to 8 bits by their high byte, as OpenCV's
    8-bit imread gets them from libpng (Pillow's convert would clip at 255 instead)."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L"):
        return image
    from PIL import Image

    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8))  # 2-D uint8: mode L


def linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (low, high) and weight of high for OpenCV's INTER_LINEAR along one axis:
    pixel centres aligned (x = (i + 0.5)·in/out − 0.5), edges clamped."""
    pos = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    low = np.floor(pos).astype(np.int64)
    frac = pos - low
    frac[low < 0] = 0.0
    low[low < 0] = 0
    edge = low >= size_in - 1
    frac[edge] = 0.0
    low[edge] = size_in - 1
    return low, np.minimum(low + 1, size_in - 1), frac


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 (C, H, W) image to (C, height, width), as OpenCV's
    ``cv::resize`` with INTER_LINEAR (results rounded to uint8; within 1 of OpenCV's
    fixed-point arithmetic)."""
    channels, h, w = image.shape
    if (h, w) == (height, width):
        return image
    y0, y1, fy = linear_taps(h, height)
    x0, x1, fx = linear_taps(w, width)
    x = image.astype(np.float32)
    rows = x[:, y0] * (1 - fy)[:, None].astype(np.float32) + x[:, y1] * fy[:, None].astype(
        np.float32)
    out = rows[:, :, x0] * (1 - fx).astype(np.float32) + rows[:, :, x1] * fx.astype(np.float32)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike, height: int = 0, width: int = 0,
               is_color: bool = True) -> np.ndarray:
    """Caffe's ReadImageToCVMat: decode ``path`` (see ``decode_image``), then resize to
    height × width when both are non-zero."""
    image = decode_image(path, is_color)
    if height > 0 and width > 0:
        image = resize_image(image, height, width)
    return image
