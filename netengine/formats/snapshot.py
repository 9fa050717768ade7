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
from netengine.blob import blob_array, blob_proto
from netengine.errors import NetEngineError, NetSyntaxError, SolverError
from netengine.formats.hdf5 import import_h5py, open_hdf5
from netengine.formats.prototxt import read_binary_proto, write_atomic, write_binary_proto
from netengine.proto import caffe_pb2

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# -- weights --------------------------------------------------------------------------------------
# The Net hands its weights in as a NetParameter (binary) or as arrays per layer (HDF5) and takes
# arrays back out; this module never sees a Net.
def is_hdf5(path: str | os.PathLike) -> bool:
    """True when ``path`` starts with HDF5's signature (Caffe's H5Fis_hdf5 test)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == HDF5_MAGIC
    except OSError:
        return False


def _h5py():
    return import_h5py("HDF5 snapshots (use snapshot_format: BINARYPROTO without it)")


def _h5_bytes(fill) -> bytes:
    """Build an HDF5 file in memory with ``fill(h5file)`` and return its bytes."""
    h5py = _h5py()
    buffer = _io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        fill(handle)
    return buffer.getvalue()


def write_weights(path: str | os.PathLike, param: caffe_pb2.NetParameter) -> None:
    """Write a NetParameter with its blobs (Net::ToProto) as a binary caffemodel, atomically."""
    write_binary_proto(path, param)


LayerArrays = list[tuple[str, dict[int, object]]]  # [(layer name, {param index: array})]


def write_weights_hdf5(path: str | os.PathLike, data: LayerArrays,
                       diff: LayerArrays | None = None) -> None:
    """Write weights in Caffe's HDF5 layout (Net::ToHDF5), atomically: group ``data`` (and
    ``diff``) holding one group per layer with one dataset per param index."""

    def fill(handle) -> None:
        for group_name, layers in (("data", data), ("diff", diff)):
            if layers is None:
                continue
            group = handle.create_group(group_name)
            for name, arrays in layers:
                layer_group = group.require_group(name)
                for j, array in arrays.items():
                    layer_group.create_dataset(str(j), data=_host32(array))

    write_atomic(path, _h5_bytes(fill))


def _host32(array) -> np.ndarray:
    return np.ascontiguousarray(backend.to_host(array), dtype=np.float32)


def read_weights_hdf5(path: str | os.PathLike) -> dict[str, dict[int, np.ndarray]]:
    """The ``data`` group of a ``.caffemodel.h5``: {layer name: {param index: float32 array}},
    in the file's order (Caffe's CopyTrainedLayersFromHDF5 reads the same)."""
    h5py = _h5py()
    with open_hdf5(path, "HDF5 weights") as handle:
        data = handle.get("data")
        if not isinstance(data, h5py.Group):
            raise NetEngineError("not a Caffe HDF5 weights file: expected a group 'data' holding "
                                 "one group per layer" + (", found a dataset" if data else ""),
                                 file=str(path))
        layers: dict[str, dict[int, np.ndarray]] = {}
        for name, group in data.items():
            if not isinstance(group, h5py.Group):
                raise NetEngineError(f"'data/{name}' is a dataset; expected a group of the "
                                     "layer's params 0, 1, ...", file=str(path))
            layers[name] = {int(j): np.asarray(group[j][()], dtype=np.float32)
                            for j in group if j.isdigit()}
        return layers


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
    return SolverStateData(message.iter, _text(message.learned_net), history,
                           message.current_step)


def _text(value) -> str:
    """A proto string field as text (a damaged file may carry bytes that are not UTF-8)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


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
    values = np.asarray(handle[name][()]).reshape(-1)
    if values.size != 1 or values.dtype.kind not in "iu":
        raise SolverError(f"HDF5 solver state: '{name}' must hold one integer, found "
                          f"{values.size} value(s) of type {values.dtype}", file=str(path))
    return int(values[0])


def _read_state_hdf5(path: Path) -> SolverStateData:
    h5py = _h5py()
    with open_hdf5(path, "HDF5 solver state", SolverError) as handle:
        state = SolverStateData(iter=_scalar_int(handle, "iter", path))
        if "learned_net" in handle:
            raw = handle["learned_net"][()]
            raw = raw.tobytes() if isinstance(raw, np.ndarray) else raw
            state.learned_net = (raw.decode("utf-8", "replace") if isinstance(raw, bytes)
                                 else str(raw)).rstrip("\0")
        state.current_step = _scalar_int(handle, "current_step", path)
        history = handle.get("history")
        if history is not None and not isinstance(history, h5py.Group):
            raise SolverError("'history' is a dataset; expected a group of blobs 0, 1, ...",
                              file=str(path))
        count = len(history) if history is not None else 0
        for i in range(count):
            if str(i) not in history:
                raise SolverError(f"history blob {i} is missing", file=str(path))
            state.history.append(np.asarray(history[str(i)][()], dtype=np.float32))
    return state


def resolve_learned_net(learned_net: str, state_path: str | os.PathLike) -> Path:
    """The weights file a solverstate names: as written (relative to the current directory,
    Caffe's rule), else beside the solverstate."""
    if "\0" in learned_net:
        raise SolverError("the solver state's learned_net holds a NUL character; expected the "
                          "path of its caffemodel", file=str(state_path))
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
