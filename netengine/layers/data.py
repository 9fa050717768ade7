"""Data layers: where blobs enter the net (Input for deploy nets; readers for training).

Data (LMDB of Datum records, or MNIST IDX files), MemoryData, DummyData, HDF5Data, ImageData
(image list files) and WindowData (R-CNN window files). Readers prepare batches on the host
(NumPy) and copy them into the tops on the tops' device.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import weakref
from pathlib import Path

import numpy as np

from netengine import backend, fillers
from netengine.blob import Blob
from netengine.data.db import LevelDBSource, LMDBSource, is_leveldb, is_lmdb
from netengine.data.idx import IDXSource
from netengine.data.images import decode_image, import_pillow, read_image, resize_image
from netengine.data.sources import read_bytes, resolve_source, search_description
from netengine.data.transform import Transformer, read_mean_file
from netengine.errors import DataSourceError, LayerError, NetEngineError
from netengine.formats.hdf5 import open_hdf5
from netengine.layers.base import Layer, register
from netengine.proto import caffe_pb2

log = logging.getLogger("netengine.data")


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
                if any(d < 1 for d in dims):
                    raise self.fail(f"input shape {dims} has a zero or negative dimension: "
                                    "expected every dim >= 1 (the first is the batch size)")
                blob.reshape(dims)

    def reshape(self, bottom, top) -> None:
        pass

    def compute_forward(self, bottom, top) -> None:
        pass

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass


# -- shared helpers for the readers -------------------------------------------------------------
def _random_seed() -> int:
    """netengine's random seed (set by the solver's random_seed); when none was set, a fresh
    one from the OS, as Caffe seeds itself: unseeded runs shuffle, crop and skip differently."""
    seed = backend.get_random_seed()
    if seed is None or seed < 0:
        return int(np.random.SeedSequence().entropy % (1 << 63))
    return int(seed)


def _to_top(blob: Blob, array: np.ndarray) -> None:
    """Copy a host array into a top blob of the same shape (on the blob's device)."""
    if blob.shape != array.shape:
        blob.reshape(array.shape)
    blob.data[...] = backend.to_module(array, blob.xp)


def _prefetch_loop(make_batch, out: queue.Queue, stop: threading.Event, index: int) -> None:
    """Worker: prepare batches index, index+1, ... into ``out`` until ``stop`` (or an error)."""
    while not stop.is_set():
        try:
            item = (index, make_batch(index), None)
        except BaseException as err:  # handed to the consumer, which re-raises it
            item = (index, None, err)
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if item[2] is not None:
            return
        index += 1


class Prefetcher:
    """A daemon thread preparing the next ``depth`` batches of ``make_batch(index)``.

    ``get(index)`` returns batch ``index``; asking for any other index than the one after the
    last (a seek) restarts the thread there. ``stop()`` ends the thread and drops its queue.
    The thread holds only ``make_batch`` (never the layer), so a dropped layer can be collected.
    """

    def __init__(self, make_batch, depth: int, name: str = "netengine-prefetch") -> None:
        self.make_batch, self.depth, self.name = make_batch, max(int(depth), 1), name
        self.thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._next: int | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, index: int) -> None:
        self.stop()
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=_prefetch_loop, name=self.name, daemon=True,
                                       args=(self.make_batch, self._queue, self._stop, index))
        self._next = index
        self.thread.start()

    def get(self, index: int):
        if self.thread is None or self._next != index:
            self.start(index)
        while True:
            try:
                got, batch, err = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    self.thread = None
                    raise RuntimeError("the prefetch thread stopped unexpectedly") from None
        if err is not None:
            self.thread, self._next = None, None
            raise err
        self._next = got + 1
        return batch

    def stop(self) -> None:
        thread, self.thread, self._next = self.thread, None, None
        if thread is None:
            return
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        thread.join(timeout=10.0)


def _sharded(make_batch, rank: int, size: int):
    """Batch b of rank ``rank`` of ``size`` is batch b·size + rank of the unsharded stream."""
    if size == 1:
        return make_batch
    return lambda index: make_batch(index * size + rank)


def _check_shard(layer: Layer, rank: int, size: int) -> tuple[int, int]:
    if size < 1 or not 0 <= rank < size:
        raise layer.fail(f"a shard is rank r of size n with 0 <= r < n, got {rank} of {size}")
    return int(rank), int(size)


def _shutdown(prefetcher: Prefetcher | None, source) -> None:
    if prefetcher is not None:
        prefetcher.stop()
    if source is not None:
        source.close()


def _resolve(layer: Layer, what: str, path: str, gz: bool = True,
             extra_dirs: tuple = ()) -> Path:
    if not path:
        raise layer.fail(f"{what} is empty")
    found = resolve_source(path, (*extra_dirs, *layer.search_dirs), gz=gz)
    if found is None:
        raise layer.fail(f"{what} not found: "
                         f"{search_description(path, (*extra_dirs, *layer.search_dirs))}",
                         DataSourceError)
    # Relative sources may be found beside the solver or in netengine's own data: say which.
    log.info("%s '%s': %s %s", layer.type, layer.name, what, found.resolve())
    return found


def _image_source(layer: Layer, field: str, param) -> Path:
    """The checks ImageData and WindowData share: their text source (found), Pillow present,
    a positive batch_size."""
    source = _resolve(layer, f"{field}.source", param.source, gz=False)
    try:
        import_pillow()
    except NetEngineError as err:
        raise layer.fail(err.detail) from None
    if param.batch_size <= 0:
        raise layer.fail(f"{field}.batch_size must be positive")
    return source


@register
class Data(Layer):
    """Caffe's Data layer: batches of records → data (N, C, H, W) and optional label (N,).

    data_param: ``source``, ``batch_size``, ``backend`` (LMDB, or LEVELDB through the optional
    plyvel package; the folder's contents decide), ``prefetch`` (batches prepared ahead by a
    background thread; 0 = none), ``rand_skip``. Encoded records (PNG/JPEG bytes) are decoded;
    transform_param's force_color / force_gray choose their channels. With a crop_size,
    records may differ in size (each is cropped).
    netengine's extension: a source naming an MNIST IDX images file (``…-idx3-ubyte[.gz]``) is
    read directly, labels from the ``…-idx1-ubyte[.gz]`` file beside it (backend ignored).
    Relative sources resolve against the current directory, then ``search_dirs`` (set by the
    net), then ``netengine.data.sources.SEARCH_DIRS`` (the repository root).

    Records are served in order and wrap around: batch ``b`` holds records
    ``[s + b·N, s + (b+1)·N) mod size`` with ``s`` the rand_skip offset (drawn once from the
    seed, in [0, rand_skip), as Caffe skips ``rand() % rand_skip`` records). transform_param
    gives ``top = (x − mean)·scale``, then crop (TRAIN: random offset; TEST: centre) and
    mirror (a coin flip per image in both phases, as Caffe). The coins and offsets of batch
    ``b`` come from a generator seeded with (random seed at setup, b), so ``seek(b)`` (the
    next forward serves batch b) makes a resumed run bit-identical to an uninterrupted one.
    Deprecated data_param scale/mean_file/crop_size/mirror (V1 nets) are honoured when
    transform_param does not set the same field.
    """

    type = "Data"
    exact_bottoms = 0
    min_tops = 1
    max_tops = 2
    search_dirs: tuple = ()
    shard = (0, 1)  # (rank, size) of a data-parallel run, handed in by set_shard

    def layer_setup(self, bottom, top: list[Blob]) -> None:
        p = self.layer_param.data_param
        if p.batch_size <= 0:
            raise self.fail("data_param.batch_size must be positive")
        self.batch_size = int(p.batch_size)
        self.source = self._open_source(p)
        self.transformer = self._make_transformer(p)
        try:
            shape = self.transformer.output_shape(self.source.shape)
        except NetEngineError as err:
            self.source.close()
            raise self.fail(err.detail) from None
        self.seed = _random_seed()
        self.skip = 0
        if p.rand_skip:
            skip_rng = np.random.default_rng([self.seed, 0x5EED])
            self.skip = int(skip_rng.integers(0, p.rand_skip))
        self._next = 0
        top[0].reshape((self.batch_size, *shape))
        if len(top) > 1:
            top[1].reshape((self.batch_size,))
        self.prefetcher = (Prefetcher(self._batch_maker(), p.prefetch,
                                      f"netengine-prefetch-{self.name}")
                           if p.prefetch > 0 else None)
        self._finalizer = weakref.finalize(self, _shutdown, self.prefetcher, self.source)

    def _open_source(self, p):
        path = _resolve(self, "data_param.source", p.source)
        try:
            if path.is_file() and path.suffix != ".mdb":
                return IDXSource(path)
            explicit_leveldb = (p.HasField("backend")
                                and p.backend == caffe_pb2.DataParameter.LEVELDB)
            # Caffe shapes each batch from its first record: with a crop, or one record per
            # batch, records may differ in size
            ragged = bool(self._transform_param(p).crop_size) or self.batch_size == 1
            if is_leveldb(path):
                return LevelDBSource(path, self._forced_color(), ragged=ragged)
            if explicit_leveldb and is_lmdb(path):
                raise self.fail(f"{path} is an LMDB database but data_param.backend is LEVELDB: "
                                "set backend: LMDB")
            if not is_lmdb(path):
                raise self.fail(f"{path} is neither an LMDB folder (with data.mdb), a LevelDB "
                                "folder (with CURRENT) nor an MNIST IDX images file")
            return LMDBSource(path, self._forced_color(), ragged=ragged)
        except NetEngineError as err:
            if isinstance(err, LayerError) and err.layer is not None:
                raise
            raise self.fail(err.detail) from None

    def _forced_color(self) -> bool | None:
        """transform_param's force_color (True) / force_gray (False) for encoded records."""
        t = self.layer_param.transform_param
        if t.force_color and t.force_gray:
            raise self.fail("transform_param: cannot set both force_color and force_gray")
        return True if t.force_color else False if t.force_gray else None

    def _transform_param(self, p) -> caffe_pb2.TransformationParameter:
        """transform_param, with the deprecated data_param fields it does not set (V1 nets)."""
        param = caffe_pb2.TransformationParameter()
        param.CopyFrom(self.layer_param.transform_param)
        for old in ("scale", "mean_file", "crop_size", "mirror"):
            if p.HasField(old) and not param.HasField(old):
                setattr(param, old, getattr(p, old))
        return param

    def _make_transformer(self, p) -> Transformer:
        param = self._transform_param(p)
        mean = None
        try:
            if param.HasField("mean_file"):
                if len(param.mean_value):
                    raise self.fail("transform_param: give mean_file or mean_value, not both")
                mean = read_mean_file(
                    _resolve(self, "transform_param.mean_file", param.mean_file, gz=False))
            return Transformer(param, self.phase, mean)
        except NetEngineError as err:
            if isinstance(err, LayerError) and err.layer is not None:
                raise
            raise self.fail(err.detail) from None

    def _batch_maker(self):
        """A function of the batch index only (no reference to the layer): safe in a thread."""
        source, transformer, dtype = self.source, self.transformer, self.dtype
        n, skip, seed, size = self.batch_size, self.skip, self.seed, len(self.source)

        def make_batch(index: int):
            records = (skip + index * n + np.arange(n, dtype=np.int64)) % size
            images, labels = source.read(records)
            rng = np.random.default_rng([seed, int(index)])
            return transformer.apply(images, rng, dtype), labels.astype(dtype)

        return make_batch

    # -- position ---------------------------------------------------------------------------
    @property
    def batch_index(self) -> int:
        """The batch number the next forward serves (counted from the start)."""
        return self._next

    def seek(self, batch_index: int) -> None:
        """Make the next forward serve batch ``batch_index`` (records b·N … (b+1)·N − 1)."""
        if batch_index < 0:
            raise self.fail(f"seek needs a batch index >= 0, got {batch_index}")
        self._next = int(batch_index)

    def set_shard(self, rank: int, size: int) -> None:
        """Serve rank ``rank`` of ``size``'s share: this layer's batch b is batch b·size + rank
        of one process's stream (a contiguous slice of the global batch; its transform coins
        are that batch's, so each rank draws its own)."""
        self.shard = _check_shard(self, rank, size)
        if self.prefetcher is not None:
            self.prefetcher.stop()
            self.prefetcher.make_batch = _sharded(self._batch_maker(), *self.shard)

    def close(self) -> None:
        """Stop the prefetch thread and close the source (also done when collected)."""
        self._finalizer()

    # -- passes -----------------------------------------------------------------------------
    def reshape(self, bottom, top) -> None:
        pass

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The host arrays (data, labels) of the next batch; advances the position."""
        index = self._next
        try:
            if self.prefetcher is None:
                batch = _sharded(self._batch_maker(), *self.shard)(index)
            else:
                batch = self.prefetcher.get(index)
        except NetEngineError as err:
            raise self.fail(f"batch {index}: {err.detail}") from None
        except Exception as err:
            raise self.fail(f"reading batch {index} failed: {type(err).__name__}: {err}") from err
        self._next = index + 1
        return batch

    def compute_forward(self, bottom, top) -> None:
        data, labels = self.next_batch()
        _to_top(top[0], data)
        if len(top) > 1:
            _to_top(top[1], labels)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass


@register
class MemoryData(Layer):
    """Caffe's MemoryData: batches from arrays given with ``set_input_arrays(data, labels)``.

    memory_data_param gives batch_size, channels, height, width (all required, > 0); tops
    data (N, C, H, W) and label (N,). Like Caffe's Reset path, the arrays are served as they
    are (no transform_param), batch after batch, wrapping around; their number of items must
    be a multiple of batch_size. Unlike Caffe, the arrays are copied (changing them afterwards
    has no effect) in the layer's dtype on its device.
    """

    type = "MemoryData"
    exact_bottoms = 0
    exact_tops = 2
    shard = (0, 1)

    def layer_setup(self, bottom, top: list[Blob]) -> None:
        p = self.layer_param.memory_data_param
        dims = (p.batch_size, p.channels, p.height, p.width)
        if min(dims) <= 0:
            raise self.fail("memory_data_param needs batch_size, channels, height and width, "
                            f"all positive; got {dims}")
        self.batch_size = int(p.batch_size)
        self.item_shape = (int(p.channels), int(p.height), int(p.width))
        self._data = self._labels = None
        self._pos = 0
        top[0].reshape((self.batch_size, *self.item_shape))
        top[1].reshape((self.batch_size,))

    def _device_array(self, array):
        if not hasattr(array, "shape"):
            array = np.asarray(array)
        return backend.to_module(array, self.xp).astype(self.dtype, copy=True)

    def reset(self, data, labels) -> None:
        """Serve ``data`` (N, C, H, W) and ``labels`` (N,) from the start."""
        shape = tuple(getattr(data, "shape", np.shape(data)))
        if len(shape) != 4 or shape[1:] != self.item_shape:
            wanted = ", ".join(map(str, self.item_shape))
            raise self.fail(f"set_input_arrays needs data of shape (N, {wanted}), got {shape}")
        label_shape = tuple(getattr(labels, "shape", np.shape(labels)))
        if (not label_shape or label_shape[0] != shape[0]
                or int(np.prod(label_shape[1:], dtype=np.int64)) != 1):
            raise self.fail(f"set_input_arrays needs {shape[0]} labels (shape (N,) or "
                            f"(N, 1, 1, 1)), got shape {label_shape}")
        if shape[0] == 0 or shape[0] % self.batch_size:
            raise self.fail(f"the number of items ({shape[0]}) must be a positive multiple of "
                            f"batch_size {self.batch_size}")
        self._data = self._device_array(data)
        self._labels = self._device_array(labels).reshape(-1)
        self._pos = 0

    set_input_arrays = reset

    def set_batch_size(self, batch_size: int) -> None:
        if batch_size <= 0:
            raise self.fail(f"batch_size must be positive, got {batch_size}")
        if self._data is not None and len(self._data) % batch_size:
            raise self.fail(f"the number of items ({len(self._data)}) must be a multiple of "
                            f"batch_size {batch_size}")
        self.batch_size = int(batch_size)
        self._pos = 0

    @property
    def batch_index(self) -> int:
        return self._pos // (self.batch_size * self.shard[1])

    def seek(self, batch_index: int) -> None:
        """Make the next forward serve batch ``batch_index`` (wrapping around the arrays)."""
        n = len(self._data) if self._data is not None else self.batch_size
        self._pos = (int(batch_index) * self.batch_size * self.shard[1]) % n

    def set_shard(self, rank: int, size: int) -> None:
        """Serve rank ``rank`` of ``size``'s contiguous slice of each global batch of
        size·batch_size items (``_pos`` counts global items)."""
        self.shard = _check_shard(self, rank, size)
        self._pos = 0

    def reshape(self, bottom, top) -> None:
        top[0].reshape((self.batch_size, *self.item_shape))
        top[1].reshape((self.batch_size,))

    def compute_forward(self, bottom, top) -> None:
        if self._data is None:
            raise self.fail("no data: call set_input_arrays(data, labels) before forward")
        rank, size = self.shard
        start = (self._pos + rank * self.batch_size) % len(self._data)
        end = start + self.batch_size
        top[0].data[...] = self._data[start:end]
        top[1].data[...] = self._labels[start:end]
        self._pos = (self._pos + size * self.batch_size) % len(self._data)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass


@register
class DummyData(Layer):
    """Caffe's DummyData: tops of given shapes filled by data_filler(s).

    dummy_data_param: ``shape`` (1 or one per top) or the legacy num/channels/height/width
    (each 1 or one per top; not both forms); ``data_filler``: none (constant 0), one for every
    top, or one per top. All tops are filled at setup; forward refills only the tops whose
    filler is not "constant" (Caffe's refill rule), drawing from netengine's seeded generator.
    """

    type = "DummyData"
    exact_bottoms = 0
    min_tops = 1

    def layer_setup(self, bottom, top: list[Blob]) -> None:
        p = self.layer_param.dummy_data_param
        n = len(top)
        if len(p.data_filler) not in (0, 1, n):
            raise self.fail(f"give 0, 1 or {n} data_filler(s) (one per top), "
                            f"got {len(p.data_filler)}")
        legacy = {f: list(getattr(p, f)) for f in ("num", "channels", "height", "width")}
        if any(legacy.values()):
            if len(p.shape):
                raise self.fail("give shape or num/channels/height/width, not both")
            for field, values in legacy.items():
                if len(values) not in (1, n):
                    raise self.fail(f"legacy dummy_data_param needs 1 or {n} '{field}' value(s), "
                                    f"got {len(values)}")
            shapes = [tuple(legacy[f][i if len(legacy[f]) > 1 else 0] for f in legacy)
                      for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                wanted = "1 shape" if n == 1 else f"1 shape (shared) or {n} (one per top)"
                raise self.fail(f"dummy_data_param needs {wanted}, got {len(p.shape)}")
            shapes = [tuple(p.shape[i if len(p.shape) > 1 else 0].dim) for i in range(n)]
        if len(p.data_filler):
            self.fillers = [p.data_filler[i if len(p.data_filler) > 1 else 0] for i in range(n)]
        else:
            self.fillers = [caffe_pb2.FillerParameter(type="constant", value=0)] * n
        self.refill = [f.type != "constant" for f in self.fillers]
        for blob, shape, filler in zip(top, shapes, self.fillers):
            blob.reshape(shape)
            self._fill(blob, filler)

    def _fill(self, blob: Blob, filler) -> None:
        try:
            fillers.fill(blob, filler)
        except LayerError as err:
            raise err.with_context(layer=self.name, layer_type=self.type) from None

    def reshape(self, bottom, top) -> None:
        pass

    def compute_forward(self, bottom, top) -> None:
        for blob, filler, refill in zip(top, self.fillers, self.refill):
            if refill:
                self._fill(blob, filler)

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass


def _import_h5py(layer_type: str = "HDF5Data"):
    try:
        import h5py
    except ImportError:
        raise LayerError(f"{layer_type} needs the h5py package: pip install 'netengine[hdf5]' "
                         "(or pip install h5py)") from None
    return h5py


@register
class HDF5Data(Layer):
    """Caffe's HDF5Data: rows of the datasets named by the tops, from a list of .h5 files.

    hdf5_data_param: ``source`` (a text file listing .h5 files, one per line; relative names
    resolve against the current directory, then the list's folder), ``batch_size``,
    ``shuffle``. Top i has shape (batch_size, *dataset_i.shape[1:]); all datasets of a file
    have the same number of rows. Rows are served in order, file after file, wrapping around;
    with shuffle the file order is shuffled at setup and at every wrap, and the rows of a file
    whenever it is loaded or restarted (Caffe's rule), from a generator seeded with the
    random seed. ``seek(b)`` replays that bookkeeping, so batch b is reproducible. As in Caffe,
    transform_param is refused. Needs the optional h5py package.
    """

    type = "HDF5Data"
    exact_bottoms = 0
    min_tops = 1
    search_dirs: tuple = ()
    shard = (0, 1)

    def layer_setup(self, bottom, top: list[Blob]) -> None:
        try:
            self._h5py = _import_h5py()
        except LayerError as err:
            raise err.with_context(layer=self.name, layer_type=self.type) from None
        p = self.layer_param.hdf5_data_param
        if self.layer_param.HasField("transform_param"):
            raise self.fail("HDF5Data does not transform data: remove transform_param")
        if p.batch_size <= 0:
            raise self.fail("hdf5_data_param.batch_size must be positive")
        self.batch_size = int(p.batch_size)
        self.shuffle = p.shuffle
        self.names = list(self.layer_param.top)
        listing = _resolve(self, "hdf5_data_param.source", p.source, gz=False)
        try:
            lines = [ln.strip() for ln in listing.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise self.fail(f"{listing} is a binary file (an .h5 itself?): hdf5_data_param."
                            "source is a text file listing .h5 files, one per line") from None
        except OSError as err:
            raise self.fail(f"cannot read {listing}: {err.strerror or err}") from None
        names = [ln for ln in lines if ln and not ln.startswith("#")]
        if not names:
            raise self.fail(f"{listing} lists no HDF5 files")
        self.files = [_resolve(self, f"HDF5 file listed in {listing}", name, gz=False,
                               extra_dirs=(str(listing.parent),)) for name in names]
        self.rows = [self._row_count(path) for path in self.files]
        self.seed = _random_seed()
        self._restart()
        self._ensure_loaded()
        for blob, array in zip(top, self._arrays):
            blob.reshape((self.batch_size, *array.shape[1:]))

    def _open(self, path: Path):
        """The file read-only, self-contained (no external links), any h5py failure on a
        damaged file turned into one line naming it."""
        return open_hdf5(path, "HDF5 data file", LayerError)

    def _row_count(self, path: Path) -> int:
        with self._open(path) as handle:
            counts = set()
            for name in self.names:
                if name not in handle:
                    raise self.fail(f"{path} has no dataset '{name}' (datasets are named by the "
                                    f"tops: {', '.join(self.names)})")
                if handle[name].ndim < 1:
                    raise self.fail(f"{path}: dataset '{name}' is a scalar; expected rows")
                counts.add(handle[name].shape[0])
        if len(counts) != 1:
            raise self.fail(f"{path}: the datasets {', '.join(self.names)} have different "
                            f"numbers of rows ({sorted(counts)})")
        rows = counts.pop()
        if rows == 0:
            raise self.fail(f"{path} holds no rows")
        return rows

    # -- position bookkeeping (no data read) -------------------------------------------------
    def _restart(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._order = np.arange(len(self.files))
        if self.shuffle:
            self._rng.shuffle(self._order)
        self._file_pos = 0
        self._row = 0
        self._perm = self._permutation()
        self._served = 0

    def _permutation(self) -> np.ndarray:
        rows = self.rows[self._order[self._file_pos]]
        return self._rng.permutation(rows) if self.shuffle else np.arange(rows)

    def _next_file(self) -> None:
        if len(self.files) > 1:
            self._file_pos += 1
            if self._file_pos == len(self.files):
                self._file_pos = 0
                if self.shuffle:
                    self._rng.shuffle(self._order)
            self._perm = self._permutation()
        elif self.shuffle:
            self._perm = self._permutation()
        self._row = 0

    def _advance(self, count: int) -> None:
        while count:
            take = min(count, len(self._perm) - self._row)
            self._row += take
            count -= take
            if self._row == len(self._perm):
                self._next_file()

    @property
    def batch_index(self) -> int:
        return self._served // (self.batch_size * self.shard[1])

    def seek(self, batch_index: int) -> None:
        """Make the next forward serve batch ``batch_index`` counted from the start."""
        rows = int(batch_index) * self.batch_size * self.shard[1]
        self._restart()
        self._advance(rows)
        self._served = rows

    def set_shard(self, rank: int, size: int) -> None:
        """Serve rank ``rank`` of ``size``'s contiguous slice of each global batch: skip the
        rows of the ranks before and after it (``_served`` counts global rows)."""
        self.shard = _check_shard(self, rank, size)
        self.seek(0)

    # -- data ---------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        index = int(self._order[self._file_pos])
        if getattr(self, "_loaded", None) == index:
            return
        path = self.files[index]
        with self._open(path) as handle:
            self._arrays = [np.asarray(handle[name][...], dtype=self.dtype) for name in self.names]
        if any(len(a) != self.rows[index] for a in self._arrays):
            raise self.fail(f"{path} changed while in use")
        self._loaded = index

    def reshape(self, bottom, top) -> None:
        pass

    def compute_forward(self, bottom, top) -> None:
        parts: list[list[np.ndarray]] = [[] for _ in top]
        rank, size = self.shard
        self._advance(rank * self.batch_size)
        need = self.batch_size
        while need:
            self._ensure_loaded()
            take = min(need, len(self._perm) - self._row)
            rows = self._perm[self._row:self._row + take]
            for part, array in zip(parts, self._arrays):
                part.append(array[rows])
            need -= take
            self._advance(take)
        for blob, part in zip(top, parts):
            batch = np.concatenate(part)
            if batch.shape[1:] != blob.shape[1:]:
                raise self.fail(f"{self.files[self._order[self._file_pos]]}: rows of shape "
                                f"{batch.shape[1:]} where the first file had {blob.shape[1:]}")
            _to_top(blob, batch)
        self._advance((size - 1 - rank) * self.batch_size)
        self._served += self.batch_size * size

    def compute_backward(self, top, propagate_down, bottom) -> None:
        pass


# -- image readers --------------------------------------------------------------------------------
@register
class HDF5Output(Layer):
    """Caffe's HDF5Output: each forward pass writes bottom 0 as dataset "data" and bottom 1
    as dataset "label" (float32, the bottoms' shapes) into ``hdf5_output_param.file_name``.

    The file is created (truncated) at setup. Caffe can save only one batch (a second write
    of the same dataset fails there); here each pass replaces the datasets with the newest
    batch, so the file holds the last batch seen. No tops and no gradients. Needs h5py.
    """

    type = "HDF5Output"
    exact_bottoms = 2
    exact_tops = 0

    def layer_setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        try:
            self._h5py = _import_h5py(self.type)
        except LayerError as err:
            raise err.with_context(layer=self.name, layer_type=self.type) from None
        self.file_name = self.layer_param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.fail("hdf5_output_param.file_name must be given")
        self._write({})

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.fail(f"data and label must have the same number of items, got "
                            f"{bottom[0].shape} and {bottom[1].shape}")

    def _write(self, datasets: dict) -> None:
        try:
            with self._h5py.File(self.file_name, "w") as handle:
                for name, values in datasets.items():
                    handle.create_dataset(name, data=values)
        except OSError as err:
            raise self.fail(f"cannot write {self.file_name}: {err}") from None

    def compute_forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        self._write({"data": bottom[0].host_data().astype(np.float32),
                     "label": bottom[1].host_data().astype(np.float32)})

    def compute_backward(self, top, propagate_down, bottom) -> None:
        """Nothing flows back (Caffe's HDF5Output has no gradient)."""


def _image_path(name: str, dirs: tuple, where: str) -> Path:
    found = resolve_source(name, dirs, gz=False)
    if found is None:
        raise NetEngineError(f"image file not found: {search_description(name, dirs)} "
                             f"({where})")
    return found


class _ImageList:
    """The lines of an ImageData list and the order they are served in (no layer reference,
    so the prefetch thread can hold it)."""

    def __init__(self, names, labels, listing: Path, dirs: tuple, p, seed: int) -> None:
        self.names, self.labels, self.listing, self.dirs = names, labels, listing, dirs
        self.root, self.shuffle, self.seed = p.root_folder, p.shuffle, seed
        self.height, self.width, self.is_color = p.new_height, p.new_width, p.is_color
        self._order: tuple[int, np.ndarray] | None = None

    def line(self, item: int) -> int:
        """The list line served as item ``item`` (counted from the very first, skip included)."""
        epoch, pos = divmod(int(item), len(self.names))
        if not self.shuffle:
            return pos
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, 0x5107, epoch])
            self._order = (epoch, rng.permutation(len(self.names)))
        return int(self._order[1][pos])

    def load(self, line: int) -> np.ndarray:
        where = f"line {line + 1} of {self.listing}"
        path = _image_path(self.root + self.names[line], self.dirs, where)
        return read_image(path, self.height, self.width, self.is_color)


def _read_image_list(layer: Layer, listing: Path) -> tuple[list[str], np.ndarray]:
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise layer.fail(f"cannot read {listing}: {err}") from None
    names, labels = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        name, _, label = line.rpartition(" ")
        try:
            labels.append(int(label))
        except ValueError:
            raise layer.fail(f"{listing} line {number}: expected 'path label' (an integer label "
                             f"after the last space), got {line!r}") from None
        names.append(name.strip())
    if not names:
        raise layer.fail(f"{listing} lists no images")
    return names, np.asarray(labels, dtype=np.int64)


@register
class ImageData(Data):
    """Caffe's ImageData: the images of a list file → data (N, C, H, W) and label (N,).

    image_data_param: ``source`` (text file of ``path label`` lines; the label follows the
    last space), ``root_folder`` (prefixed to every path as a plain string, as Caffe),
    ``batch_size``, ``shuffle``, ``new_height``/``new_width`` (bilinear resize as OpenCV's
    INTER_LINEAR when both are set; 0 = none), ``is_color`` (3 channels in OpenCV's **BGR**
    order, else 1 gray channel), ``rand_skip``. Decoding needs Pillow (the ``images`` extra).
    A relative image path resolves against the current directory (Caffe's rule), then the list
    file's folder and ``search_dirs``. transform_param as for Data (deprecated
    image_data_param scale/mean_file/crop_size/mirror honoured); data_param.prefetch is the
    prefetch depth (Caffe's prefetching base class reads it there too).

    Serving order: item ``g = s + b·N + i`` of batch b is line ``order_e[g mod L]`` with
    e = g div L (L lines, s the rand_skip offset drawn once in [0, rand_skip)), so after the
    first wrap the list restarts at line 0 as in Caffe. Without shuffle ``order_e`` is the file
    order; with it a permutation drawn from (random seed, e): a new shuffle every epoch, as
    Caffe reshuffles at each wrap. Transform coins/offsets come from (seed, b) as for Data,
    so ``seek(b)`` reproduces batch b exactly. The first image fixes the tops' shapes at setup;
    a batch takes the size of its images, which must agree (batch_size 1 serves any sizes).
    """

    type = "ImageData"
    min_tops = max_tops = None
    exact_tops = 2

    def layer_setup(self, bottom, top: list[Blob]) -> None:
        p = self.layer_param.image_data_param
        listing = _image_source(self, "image_data_param", p)
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.fail(f"image_data_param: set new_height and new_width together (both 0 = "
                            f"no resize), got {p.new_height} x {p.new_width}")
        self.batch_size = int(p.batch_size)
        names, labels = _read_image_list(self, listing)
        self.transformer = self._make_transformer(p)
        self.seed = _random_seed()
        self.skip = 0
        if p.rand_skip:
            self.skip = int(np.random.default_rng([self.seed, 0x5EED]).integers(0, p.rand_skip))
            if self.skip >= len(names):
                raise self.fail(f"rand_skip drew {self.skip} but {listing} lists only "
                                f"{len(names)} images")
        self.source = None
        self.images = _ImageList(names, labels, listing, (str(listing.parent), *self.search_dirs),
                                 p, self.seed)
        try:
            first = self.images.load(self.images.line(self.skip))
            shape = self.transformer.output_shape(first.shape)
        except NetEngineError as err:
            raise self.fail(err.detail) from None
        self._next = 0
        top[0].reshape((self.batch_size, *shape))
        top[1].reshape((self.batch_size,))
        prefetch = self.layer_param.data_param.prefetch
        self.prefetcher = (Prefetcher(self._batch_maker(), prefetch,
                                      f"netengine-prefetch-{self.name}") if prefetch else None)
        self._finalizer = weakref.finalize(self, _shutdown, self.prefetcher, None)

    def _batch_maker(self):
        images, transformer, dtype = self.images, self.transformer, self.dtype
        n, skip, seed = self.batch_size, self.skip, self.seed

        def make_batch(index: int):
            lines = [images.line(skip + index * n + i) for i in range(n)]
            loaded = [images.load(line) for line in lines]
            ragged = any(image.shape != loaded[0].shape for image in loaded)
            if ragged and not transformer.crop:
                k = next(k for k, im in enumerate(loaded) if im.shape != loaded[0].shape)
                image = loaded[k]
                raise NetEngineError(
                    f"{images.names[lines[k]]} is {image.shape[1]}x{image.shape[2]} but "
                    f"{images.names[lines[0]]} is {loaded[0].shape[1]}x{loaded[0].shape[2]}:"
                    " the images of a batch need one size (set new_height and new_width, "
                    "or a transform_param.crop_size)")
            rng = np.random.default_rng([seed, int(index)])
            data = transformer.apply(loaded if ragged else np.stack(loaded), rng, dtype)
            return data, images.labels[lines].astype(dtype)

        return make_batch


def _round_half_away(x: float) -> int:
    """C's round(): halves away from zero."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(0.5 - x))


def _crop_window(image: np.ndarray, box, crop: int, context_pad: int, square: bool,
                 flip: bool) -> tuple[np.ndarray, int, int]:
    """R-CNN's window crop: (patch (C, h, w) uint8, already mirrored; top pad; left pad)."""
    _, rows, cols = image.shape
    x1, y1, x2, y2 = box
    pad_h = pad_w = 0
    out_h = out_w = crop
    if context_pad > 0 or square:
        context = crop / (crop - 2 * context_pad)
        half_h, half_w = (y2 - y1 + 1) / 2.0, (x2 - x1 + 1) / 2.0
        centre_x, centre_y = x1 + half_w, y1 + half_h
        if square:
            half_h = half_w = max(half_h, half_w)
        x1 = _round_half_away(centre_x - half_w * context)
        x2 = _round_half_away(centre_x + half_w * context)
        y1 = _round_half_away(centre_y - half_h * context)
        y2 = _round_half_away(centre_y + half_h * context)
        scale_x, scale_y = crop / (x2 - x1 + 1), crop / (y2 - y1 + 1)
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        out_w = _round_half_away((x2 - x1 + 1) * scale_x)
        out_h = _round_half_away((y2 - y1 + 1) * scale_y)
        pad_h = _round_half_away(pad_y1 * scale_y)
        pad_w = _round_half_away((pad_x2 if flip else pad_x1) * scale_x)
        out_h, out_w = min(out_h, crop - pad_h), min(out_w, crop - pad_w)
    else:  # Caffe assumes the window lies inside the image; netengine clips it
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, cols - 1), min(y2, rows - 1)
    if x2 < x1 or y2 < y1 or out_h <= 0 or out_w <= 0:
        raise NetEngineError(f"window {tuple(box)} lies outside the {cols}x{rows} image")
    patch = resize_image(image[:, y1:y2 + 1, x1:x2 + 1], out_h, out_w)
    return (patch[:, :, ::-1] if flip else patch), pad_h, pad_w


@register
class WindowData(Data):
    """Caffe's WindowData (R-CNN): warped windows of images → data (N, C, S, S), label (N,).

    window_data_param ``source`` is a window file of blocks ``# index`` / image path /
    channels / height / width / window count / one ``class overlap x1 y1 x2 y2`` line per
    window (inclusive pixel corners). A window with overlap ≥ fg_threshold is foreground
    (its class must be > 0); one with overlap < bg_threshold background (label 0); others are
    unused. Each batch holds N − ⌊N·fg_fraction⌋ background windows, then ⌊N·fg_fraction⌋
    foreground ones, each drawn uniformly with replacement; a mirror coin per window.

    Crop (S = transform_param.crop_size, required): with context_pad > 0 or crop_mode
    "square" the box is grown about its centre by S / (S − 2·context_pad) (square: to its
    longer side first), clipped to the image; the clipped part is warped by the same scale
    and placed at its offset in an S×S zero canvas (mirrored windows use the right-hand pad).
    Otherwise ("warp") the box is warped to S×S. Pixels get ``(x − mean)·scale`` with
    mean_value, or mean_file's centred S×S region at the same canvas position; padding stays
    0. Images load in OpenCV's BGR order (1-channel window files load gray); ``root_folder``
    prefixes each path; ``cache_images`` keeps the files' bytes in memory from setup.
    Draws come from (random seed, b): ``seek(b)`` reproduces batch b.
    """

    type = "WindowData"
    min_tops = max_tops = None
    exact_tops = 2

    def layer_setup(self, bottom, top: list[Blob]) -> None:
        p = self.layer_param.window_data_param
        source = _image_source(self, "window_data_param", p)
        if p.crop_mode not in ("warp", "square"):
            raise self.fail(f"window_data_param.crop_mode must be 'warp' or 'square', "
                            f"got '{p.crop_mode}'")
        if not 0 <= p.fg_fraction <= 1:
            raise self.fail(f"window_data_param.fg_fraction must be in [0, 1], "
                            f"got {p.fg_fraction}")
        self.batch_size = n = int(p.batch_size)
        t = self.transformer = self._make_transformer(p)
        crop = int(t.crop)
        if crop <= 0:
            raise self.fail("WindowData needs transform_param.crop_size > 0")
        if 2 * p.context_pad >= crop:
            raise self.fail(f"context_pad {p.context_pad} leaves nothing of crop_size {crop}")
        paths, fg, bg = self._read_windows(source, p)
        channels = self.channels = paths[0][1]
        if channels not in (1, 3):
            raise self.fail(f"{source}: images need 1 or 3 channels, the first has {channels}")
        num_fg = int(np.float32(n) * np.float32(p.fg_fraction))
        for count, windows, what in ((num_fg, fg, "foreground"), (n - num_fg, bg, "background")):
            if count and not len(windows):
                raise self.fail(f"{source} has no {what} windows but a batch needs {count} "
                                f"(fg_threshold {p.fg_threshold}, bg_threshold {p.bg_threshold})")
        mean = None
        try:
            if t.mean_file is not None:
                mean = t.mean_file
                off = (mean.shape[2] - crop) // 2
                if mean.shape[0] != channels or off < 0 or mean.shape[1] < off + crop:
                    raise self.fail(f"the mean file's shape {mean.shape} does not cover "
                                    f"{channels} channels of {crop}x{crop} (centred)")
                mean = mean[:, off:off + crop, off:off + crop]
            elif len(t.mean_value):
                if len(t.mean_value) not in (1, channels):
                    raise self.fail(f"give 1 mean_value or one per channel ({channels}), "
                                    f"got {len(t.mean_value)}")
                mean = np.broadcast_to(t.mean_value.reshape(-1, 1, 1), (channels, crop, crop))
            dirs = (str(source.parent), *self.search_dirs)
            files = [_image_path(p.root_folder + name, dirs, f"image {i} of {source}")
                     if p.cache_images else None for i, (name, *_) in enumerate(paths)]
            cache = [read_bytes(f) if f else None for f in files]
        except NetEngineError as err:
            if isinstance(err, LayerError) and err.layer is not None:
                raise
            raise self.fail(err.detail) from None
        self.seed = _random_seed()
        self.source = None
        self._next = 0
        self._sampler = dict(paths=paths, root=p.root_folder, dirs=dirs, cache=cache, fg=fg,
                             bg=bg, num_fg=num_fg, crop=crop, pad=int(p.context_pad),
                             square=p.crop_mode == "square", mirror=t.mirror, scale=t.scale,
                             mean=mean, source=source)
        top[0].reshape((n, channels, crop, crop))
        top[1].reshape((n,))
        prefetch = self.layer_param.data_param.prefetch
        self.prefetcher = (Prefetcher(self._batch_maker(), prefetch,
                                      f"netengine-prefetch-{self.name}") if prefetch else None)
        self._finalizer = weakref.finalize(self, _shutdown, self.prefetcher, None)

    def _read_windows(self, source: Path, p):
        """(images [(path, channels, height, width)], fg rows, bg rows); a row is
        (image, label, x1, y1, x2, y2)."""
        try:
            tokens = source.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as err:
            raise self.fail(f"cannot read {source}: {err}") from None
        images, fg, bg, pos = [], [], [], 0

        def take(count: int, what: str) -> list[str]:
            nonlocal pos
            if pos + count > len(tokens):
                raise self.fail(f"{source}: image {len(images)}: file ends before its {what}")
            pos += count
            return tokens[pos - count:pos]

        while pos < len(tokens):
            hashtag, _ = take(2, "'# index' header")
            if hashtag != "#":
                raise self.fail(f"{source}: image {len(images)}: expected '# <index>', got "
                                f"'{hashtag}'")
            name, *dims = take(5, "path, channels, height, width and window count")
            try:
                channels, height, width, count = (int(d) for d in dims)
                rows = np.asarray(take(6 * count, f"{count} windows"), dtype=np.float64)
            except ValueError as err:
                raise self.fail(f"{source}: image {len(images)} ({name}): bad number: "
                                f"{err}") from None
            for label, overlap, *box in rows.reshape(-1, 6):
                row = (len(images), int(label), *(int(v) for v in box))
                if overlap >= p.fg_threshold:
                    if row[1] <= 0:
                        raise self.fail(f"{source}: image {len(images)} ({name}): a foreground "
                                        f"window (overlap {overlap:g}) has class {row[1]}; "
                                        "foreground classes must be > 0")
                    fg.append(row)
                elif overlap < p.bg_threshold:
                    bg.append((row[0], 0, *row[2:]))
            images.append((name, channels, height, width))
        if not images:
            raise self.fail(f"{source} lists no images")
        as_array = lambda rows: np.asarray(rows, dtype=np.int64).reshape(-1, 6)  # noqa: E731
        return images, as_array(fg), as_array(bg)

    def _batch_maker(self):
        s, n, seed, dtype = dict(self._sampler), self.batch_size, self.seed, self.dtype
        channels, is_color = self.channels, self.channels == 3

        def load(image: int) -> np.ndarray:
            name = s["root"] + s["paths"][image][0]
            data = s["cache"][image]
            if data is None:
                data = _image_path(name, s["dirs"], f"image {image} of {s['source']}")
            decoded = decode_image(data, is_color, name=name)
            if decoded.shape[0] != channels:  # pragma: no cover - decode_image gives 1 or 3
                raise NetEngineError(f"{name} has {decoded.shape[0]} channels, not {channels}")
            return decoded

        def make_batch(index: int):
            rng = np.random.default_rng([seed, int(index)])
            num_fg = s["num_fg"]
            picks = [s["bg"][rng.integers(0, len(s["bg"]), n - num_fg)] if n - num_fg else
                     np.zeros((0, 6), np.int64),
                     s["fg"][rng.integers(0, len(s["fg"]), num_fg)] if num_fg else
                     np.zeros((0, 6), np.int64)]
            windows = np.concatenate(picks)
            flips = (rng.integers(0, 2, n).astype(bool) if s["mirror"]
                     else np.zeros(n, dtype=bool))
            data = np.zeros((n, channels, s["crop"], s["crop"]), dtype=dtype)
            decoded: dict[int, np.ndarray] = {}
            for i, (image, _, *box) in enumerate(windows.tolist()):
                if image not in decoded:
                    decoded[image] = load(image)
                try:
                    patch, top, left = _crop_window(decoded[image], box, s["crop"], s["pad"],
                                                    s["square"], bool(flips[i]))
                except NetEngineError as err:
                    raise NetEngineError(f"image {image} of {s['source']}: {err}") from None
                h, w = patch.shape[1:]
                region = patch.astype(dtype)
                if s["mean"] is not None:
                    region -= s["mean"][:, top:top + h, left:left + w].astype(dtype)
                if s["scale"] != 1:
                    region *= dtype.type(s["scale"])
                data[i, :, top:top + h, left:left + w] = region
            return data, windows[:, 1].astype(dtype)

        return make_batch
