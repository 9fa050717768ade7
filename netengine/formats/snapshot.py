"""Snapshots in Caffe's formats: weights (``.caffemodel``) and solver state (``.solverstate``).

Binary (``snapshot_format: BINARYPROTO``, the default):

* ``<prefix>_iter_N.caffemodel``: a NetParameter, every layer's LayerParameter with its blobs
  (Caffe's Net::ToProto; diffs too with ``snapshot_diff``);
* ``<prefix>_iter_N.solverstate``: a SolverState {iter, learned_net (the caffemodel's path as
  written), history (one BlobProto per learnable param, in learnable-param order; Adam and
  AdaDelta append a second full set, so all first-moment blobs come before all second-moment
  blobs), current_step}.

HDF5 (``snapshot_format: HDF5``, needs the optional ``h5py``):

* ``<prefix>_iter_N.caffemodel.h5``: group ``data`` with one group per layer (every layer, even
  those without blobs) holding datasets ``0``, ``1``, ... for the params the layer owns (shared
  params are written once, by their owner); group ``diff`` likewise (all params) with
  ``snapshot_diff``;
* ``<prefix>_iter_N.solverstate.h5``: int32 datasets ``iter`` and ``current_step`` of shape
  (1,), a NUL-terminated string ``learned_net`` and group ``history`` with datasets ``0``...

Every file is written atomically (:func:`netengine.formats.prototxt.write_atomic`: temporary
file, fsync, rename), so a crash or kill at any moment leaves either the previous file or the
complete new one, never a truncated file. Blobs are encoded straight from the array's bytes
(packed floats), which gives the same bytes as protobuf's own serializer without a Python list
per blob.
"""
from __future__ import annotations

import io as _io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netengine import backend
from netengine.errors import NetEngineError, NetSyntaxError, SolverError
from netengine.formats.prototxt import read_binary_proto, write_atomic, write_binary_proto
from netengine.proto import caffe_pb2

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# -- fast BlobProto encoding ----------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _packed(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def blob_proto(array, shape: tuple | None = None, diff=None) -> caffe_pb2.BlobProto:
    """A BlobProto with ``shape`` and float ``data`` (and ``diff``), like Caffe's Blob::ToProto."""
    host = np.ascontiguousarray(backend.to_host(array), dtype="<f4")
    shape = host.shape if shape is None else tuple(shape)
    payload = b""
    if host.size:
        payload += _packed(0x2A, host.tobytes())  # field 5, data
    if diff is not None:
        host_diff = np.ascontiguousarray(backend.to_host(diff), dtype="<f4")
        if host_diff.size:
            payload += _packed(0x32, host_diff.tobytes())  # field 6, diff
    if shape:  # a 0-axis blob has no shape field, as Caffe writes it
        dims = b"".join(_varint(int(d)) for d in shape)
        payload += _packed(0x3A, _packed(0x0A, dims))  # field 7, shape {dim}
    return caffe_pb2.BlobProto.FromString(payload)


def blob_array(proto) -> np.ndarray:
    """The values of a BlobProto in its own shape (BlobShape or legacy num/channels/h/w)."""
    from netengine.net import blob_from_proto

    return blob_from_proto(proto, np.float32)


# -- weights --------------------------------------------------------------------------------------
def model_proto(net, write_diff: bool = False) -> caffe_pb2.NetParameter:
    """The net with its blobs as a NetParameter (Caffe's Net::ToProto)."""
    param = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layers:
        lp = param.layer.add()
        lp.CopyFrom(layer.layer_param)
        del lp.blobs[:]
        for blob in layer.blobs:
            lp.blobs.append(blob_proto(blob.data, blob.shape,
                                       blob.diff if write_diff else None))
    return param


def is_hdf5(path: str | os.PathLike) -> bool:
    """True when ``path`` starts with HDF5's signature (Caffe's H5Fis_hdf5 test)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == HDF5_MAGIC
    except OSError:
        return False


def _h5py():
    try:
        import h5py
    except ImportError:
        raise NetEngineError("HDF5 snapshots need h5py: pip install 'netengine[hdf5]' "
                             "(or use snapshot_format: BINARYPROTO)") from None
    return h5py


def _h5_bytes(fill) -> bytes:
    """Build an HDF5 file in memory with ``fill(h5file)`` and return its bytes."""
    h5py = _h5py()
    buffer = _io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        fill(handle)
    return buffer.getvalue()


def write_model(net, path: str | os.PathLike, write_diff: bool = False) -> None:
    """Write the net's weights as a binary caffemodel, atomically."""
    write_binary_proto(path, model_proto(net, write_diff))


def write_model_hdf5(net, path: str | os.PathLike, write_diff: bool = False) -> None:
    """Write the net's weights in Caffe's HDF5 layout (Net::ToHDF5), atomically."""
    owners = net.param_owners
    ids = {pair: i for i, pair in enumerate(net.param_layer_indices)}

    def fill(handle) -> None:
        data = handle.create_group("data")
        diff = handle.create_group("diff") if write_diff else None
        for li, layer in enumerate(net.layers):
            group = data.require_group(layer.name)
            diff_group = diff.require_group(layer.name) if diff is not None else None
            for j, blob in enumerate(layer.blobs):
                if owners[ids[(li, j)]] == -1:
                    group.create_dataset(str(j), data=_host32(blob.data))
                if diff_group is not None:
                    diff_group.create_dataset(str(j), data=_host32(blob.diff))

    write_atomic(path, _h5_bytes(fill))


def _host32(array) -> np.ndarray:
    return np.ascontiguousarray(backend.to_host(array), dtype=np.float32)


def load_weights(net, path: str | os.PathLike) -> list[str]:
    """Copy weights by layer name from a caffemodel, binary or HDF5 (Caffe's
    CopyTrainedLayersFrom, which tells them apart by the HDF5 signature); returns the names of
    source layers the net does not have."""
    if not Path(path).exists():
        raise NetEngineError(f"weights file not found: {path}")
    return net.copy_from(str(path))  # binary or HDF5, told apart by content


def load_weights_hdf5(net, path: str | os.PathLike) -> list[str]:
    """Copy weights from a ``.caffemodel.h5`` (Caffe's CopyTrainedLayersFromHDF5)."""
    h5py = _h5py()
    owners = net.param_owners
    ids = {pair: i for i, pair in enumerate(net.param_layer_indices)}
    by_name = {layer.name: (i, layer) for i, layer in enumerate(net.layers)}
    ignored = []
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise NetEngineError(f"cannot read HDF5 weights {path}: {err}") from None
    with handle:
        if "data" not in handle:
            raise NetEngineError(f"{path} is not a Caffe HDF5 weights file (no 'data' group)")
        data = handle["data"]
        for name in data:
            if name not in by_name:
                ignored.append(name)
        for name, (li, layer) in by_name.items():
            if name not in data or not layer.blobs:
                continue
            group = data[name]
            if len(group) > len(layer.blobs):
                raise NetEngineError(f"incompatible number of blobs: the weights file has "
                                     f"{len(group)}, the net expects {len(layer.blobs)}",
                                     file=str(path), layer=name, layer_type=layer.type)
            for j, blob in enumerate(layer.blobs):
                if str(j) not in group:
                    if owners[ids[(li, j)]] != -1:
                        continue  # a shared param: its owner carries the values
                    raise NetEngineError(f"param {j} is missing from the weights file",
                                         file=str(path), layer=name, layer_type=layer.type)
                values = np.asarray(group[str(j)][()], dtype=np.float32)
                if values.shape != blob.shape:
                    raise NetEngineError(f"cannot copy param {j}: shape mismatch, the weights "
                                         f"file has {values.shape}, the net expects "
                                         f"{blob.shape}", file=str(path), layer=name,
                                         layer_type=layer.type)
                blob.data[...] = backend.to_module(values, blob.xp)
    net.ignored_layers = ignored
    return ignored


# -- solver state ---------------------------------------------------------------------------------
@dataclass
class SolverStateData:
    """What a solverstate holds, whatever its format."""

    iter: int = 0
    learned_net: str = ""
    history: list[np.ndarray] = field(default_factory=list)
    current_step: int = 0


def write_state(path: str | os.PathLike, state: SolverStateData) -> None:
    """Write a binary SolverState (history as given: host or device arrays)."""
    message = caffe_pb2.SolverState(iter=int(state.iter), learned_net=state.learned_net,
                                    current_step=int(state.current_step))
    for array in state.history:
        message.history.append(blob_proto(array))
    write_binary_proto(path, message)


def write_state_hdf5(path: str | os.PathLike, state: SolverStateData) -> None:
    """Write Caffe's ``.solverstate.h5`` layout."""
    h5py = _h5py()

    def fill(handle) -> None:
        handle.create_dataset("iter", data=np.array([state.iter], dtype=np.int32))
        _write_c_string(h5py, handle, "learned_net", state.learned_net)
        handle.create_dataset("current_step", data=np.array([state.current_step],
                                                            dtype=np.int32))
        history = handle.create_group("history")
        for i, array in enumerate(state.history):
            history.create_dataset(str(i), data=_host32(array))

    write_atomic(path, _h5_bytes(fill))


def _write_c_string(h5py, handle, name: str, text: str) -> None:
    """A scalar fixed-length NUL-terminated string, as HDF5's H5LTmake_dataset_string makes."""
    raw = text.encode("utf-8") + b"\0"
    kind = h5py.h5t.C_S1.copy()
    kind.set_size(len(raw))
    kind.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dataset = h5py.h5d.create(handle.id, name.encode(), kind, space)
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"))


def read_state(path: str | os.PathLike) -> SolverStateData:
    """Read a solverstate: HDF5 when the name ends in ``.h5`` (Caffe's rule) or the file has
    the HDF5 signature, binary SolverState otherwise."""
    path = Path(path)
    if not path.exists():
        raise SolverError(f"solver state not found: {path}")
    if path.name.endswith(".h5") or is_hdf5(path):
        return _read_state_hdf5(path)
    message = read_binary_proto(path, caffe_pb2.SolverState())
    if not message.history:  # every state of a net with weights has history blobs
        _refuse_weights_as_state(path)
    try:
        history = [blob_array(blob) for blob in message.history]
    except NetEngineError as err:
        raise SolverError(f"bad history blob: {err}", file=str(path)) from None
    return SolverStateData(message.iter, message.learned_net, history, message.current_step)


def read_weights(path: str) -> caffe_pb2.NetParameter:
    """A binary caffemodel as a NetParameter; a solver state given instead is named as such
    (it may even parse as a NetParameter without layers, its fields read as other ones)."""
    try:
        param = read_binary_proto(path, caffe_pb2.NetParameter())
    except NetSyntaxError:
        _refuse_solver_state(path)
        raise
    if not (len(param.layer) or len(param.layers)):
        _refuse_solver_state(path)
    return param


def _refuse_solver_state(path: str) -> None:
    """The mirror of ``_refuse_weights_as_state``: weights were asked for."""
    state = caffe_pb2.SolverState()
    try:
        state.ParseFromString(Path(path).read_bytes())
    except Exception:  # not a solver state either
        return
    if len(state.history):
        raise NetEngineError(f"{path} is a solver state, not weights: resume from it "
                             "(--snapshot, solver.restore) or load the .caffemodel written "
                             "beside it")


def _refuse_weights_as_state(path: Path) -> None:
    """A caffemodel parses as a SolverState without history (its fields read as unknown
    ones, or a V1 file's ``layers`` as ``learned_net``): say what the file is instead of
    complaining later about missing history."""
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(path.read_bytes())
    except Exception:  # not a NetParameter either: let the caller's checks speak
        return
    if len(net.layer) or len(net.layers):
        raise SolverError(f"this is a caffemodel (a net of {len(net.layer) or len(net.layers)}"
                          " layers), not a solver state: fine-tune from it with --weights, or "
                          "resume with the .solverstate written beside it", file=str(path))


def _scalar_int(handle, name: str, path) -> int:
    if name not in handle:
        raise SolverError(f"HDF5 solver state has no '{name}' dataset", file=str(path))
    return int(np.asarray(handle[name][()]).reshape(-1)[0])


def _read_state_hdf5(path: Path) -> SolverStateData:
    h5py = _h5py()
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise SolverError(f"cannot read HDF5 solver state: {err}", file=str(path)) from None
    with handle:
        state = SolverStateData(iter=_scalar_int(handle, "iter", path))
        if "learned_net" in handle:
            raw = handle["learned_net"][()]
            raw = raw.tobytes() if isinstance(raw, np.ndarray) else raw
            state.learned_net = (raw.decode("utf-8", "replace") if isinstance(raw, bytes)
                                 else str(raw)).rstrip("\0")
        state.current_step = _scalar_int(handle, "current_step", path)
        history = handle.get("history")
        count = len(history) if history is not None else 0
        for i in range(count):
            if str(i) not in history:
                raise SolverError(f"history blob {i} is missing", file=str(path))
            state.history.append(np.asarray(history[str(i)][()], dtype=np.float32))
    return state


def resolve_learned_net(learned_net: str, state_path: str | os.PathLike) -> Path:
    """The weights file a solverstate names: as written (relative to the current directory,
    Caffe's rule), else beside the solverstate."""
    named = Path(learned_net)
    candidates = [named]
    if not named.is_absolute():
        folder = Path(state_path).parent
        candidates += [folder / named, folder / named.name]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise SolverError(f"the solver state names weights file '{learned_net}', which is missing "
                      f"(looked in {Path.cwd()} and {Path(state_path).parent})",
                      file=str(state_path))
