"""Caffe's key-value databases of Datum records: LMDB (``convert_mnist_data``'s layout) and
LevelDB (Caffe's default backend).

LMDB: a directory holding ``data.mdb``; keys are ``%08d`` record indices, values serialized
``Datum`` messages (channels, height, width, ``data`` bytes of uint8 pixels in C×H×W order or
``float_data``, integer ``label``; ``encoded`` records hold PNG/JPEG bytes). Needs the optional
``lmdb`` package (``pip install 'netengine[lmdb]'``); LevelDB needs ``plyvel``.
"""
from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from netengine.data.images import decode_image
from netengine.errors import NetEngineError, reading
from netengine.proto import caffe_pb2


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
    check_lmdb_file(path)
    with reading(path, "LMDB"):
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=Path(path).is_dir())
        try:
            with env.begin() as txn:
                return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
        finally:
            env.close()


# LMDB's file starts with two meta pages (page 0 and page 1). Each is a 16-byte page header
# followed by MDB_meta: magic, version, address, map size, the two MDB_db records (48 bytes each;
# the first one's md_pad holds the page size), the last used page number and the transaction id.
# LMDB maps the file and reads pages up to the last used one: a file shorter than that dies of
# SIGBUS inside the library, so the size is checked here, before the map is made.
_LMDB_MAGIC = 0xBEEFC0DE
_LMDB_META = struct.Struct("<I4x8x8xI44x48xQQ")  # magic, psize, last_pg, txnid (from offset 16)


def check_lmdb_file(path: str | os.PathLike) -> None:
    """Refuse an LMDB whose ``data.mdb`` is not an LMDB file or is shorter than the pages its
    meta pages say are in use (a truncated copy), before anything maps it."""
    path = Path(path)
    data_file = path / "data.mdb" if path.is_dir() else path
    with reading(data_file, "LMDB"):
        size = data_file.stat().st_size
        with open(data_file, "rb") as handle:
            head = handle.read(16 + _LMDB_META.size)
            magic, psize, _, _ = _meta(head, data_file)
            if psize < 512 or psize & (psize - 1) or size < 2 * psize:
                raise NetEngineError(f"truncated or damaged LMDB: {size} bytes, page size "
                                     f"{psize}; expected two meta pages of a power-of-two size",
                                     file=str(data_file))
            handle.seek(psize)
            metas = [_meta(head, data_file), _meta(handle.read(16 + _LMDB_META.size), data_file)]
    last = max(metas, key=lambda meta: meta[3])[2]
    need = (last + 1) * psize
    if size < need:
        raise NetEngineError(f"truncated LMDB: the file has {size} bytes, its meta page says "
                             f"{last + 1} pages of {psize} bytes are in use ({need} bytes); "
                             "copy the database again", file=str(data_file))


def _meta(page: bytes, where) -> tuple[int, int, int, int]:
    if len(page) < 16 + _LMDB_META.size:
        raise NetEngineError("not an LMDB file (too short for its meta pages)", file=str(where))
    meta = _LMDB_META.unpack_from(page, 16)
    if meta[0] != _LMDB_MAGIC:
        raise NetEngineError("not an LMDB file (no LMDB magic number in its meta page)",
                             file=str(where))
    return meta


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
        check_lmdb_file(path)
        with reading(path, "LMDB"):
            return lmdb.open(str(path), readonly=True, lock=False, readahead=False,
                             subdir=Path(path).is_dir(), max_readers=256)

    def _keys(self) -> list[bytes]:
        with reading(self.name, "LMDB"), self.handle.begin() as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]

    def _values(self, keys: list[bytes]) -> list[bytes]:
        with reading(self.name, "LMDB"), self.handle.begin(buffers=False) as txn:
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
        with reading(self.name, "LevelDB"):  # plyvel.CorruptionError, IOError, ...
            return [bytes(k) for k in self.handle.iterator(include_value=False)]

    def _values(self, keys: list[bytes]) -> list[bytes]:
        with reading(self.name, "LevelDB"):
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
