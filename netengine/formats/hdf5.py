"""Opening an HDF5 file someone handed us (weights, solver state, HDF5Data rows) safely.

HDF5 can point outside the file: external links, datasets stored in external raw files and
virtual datasets read other files on the machine when touched. A weights or data file has no
business doing that, so such files are refused before anything is read. Every h5py failure
on a damaged file (h5py raises OSError, KeyError, TypeError, ValueError, RuntimeError, ...)
becomes the engine's one-line error naming the file (:class:`netengine.errors.reading`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from netengine.errors import NetEngineError, reading


def import_h5py(purpose: str = "HDF5 files"):
    """The ``h5py`` module, or a one-line error saying how to install it."""
    try:
        import h5py
    except ImportError:
        raise NetEngineError(f"{purpose} need h5py: pip install 'netengine[hdf5]' "
                             "(or pip install h5py)") from None
    return h5py


@contextmanager
def open_hdf5(path: str | os.PathLike, what: str = "HDF5 file",
              cls: type[NetEngineError] = NetEngineError) -> Iterator:
    """``with open_hdf5(path, "HDF5 weights") as handle:`` a read-only h5py File whose links
    all stay inside it; any failure inside the block becomes ``cls`` naming ``path``."""
    h5py = import_h5py()
    with reading(path, what, cls):
        with h5py.File(path, "r") as handle:
            refuse_outside_references(h5py, handle, path, cls)
            yield handle


def refuse_outside_references(h5py, group, path, cls=NetEngineError) -> None:
    """Walk the file's links (each object once, so hard-link cycles end) and refuse external
    links, external raw storage and virtual datasets."""
    seen: set = set()
    pending = [group]
    while pending:
        current = pending.pop()
        for name in current:
            link = current.get(name, getlink=True)
            where = f"{current.name.rstrip('/')}/{name}"
            if isinstance(link, h5py.ExternalLink):
                raise cls(f"HDF5 external link '{where}' -> {link.filename}:{link.path} "
                          "refused: weights and data files must be self-contained",
                          file=str(path))
            if not isinstance(link, h5py.HardLink):
                continue  # a soft link names a path inside this file, checked on its own
            item = current[name]
            if item.id in seen:
                continue
            seen.add(item.id)
            if isinstance(item, h5py.Group):
                pending.append(item)
            elif isinstance(item, h5py.Dataset) and (item.external or item.is_virtual):
                raise cls(f"HDF5 dataset '{where}' reads its values from other files "
                          "(external storage or a virtual dataset), refused: weights and data "
                          "files must be self-contained", file=str(path))
