"""Finding a data source on disk and reading its bytes.

A relative source is looked for in the current directory first (Caffe's rule), then in the
folders the Net or Solver adds (the prototxt's or solver's folder), then in the repository root;
``X`` also finds ``X.gz`` and the other way round. A gzip stream is unpacked transparently.
"""
from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

from netengine.errors import NetEngineError, reading

REPO_ROOT = Path(__file__).resolve().parents[2]

# Folders searched, after the current directory, for a relative data source. The Net/Solver
# may append the prototxt's or solver's folder (``add_search_dir``).
SEARCH_DIRS: list[Path] = [REPO_ROOT]

_GZIP_MAGIC = b"\x1f\x8b"


# -- paths ----------------------------------------------------------------------------------------
def add_search_dir(path: str | os.PathLike) -> None:
    """Also look for relative data sources in ``path`` (after the current directory)."""
    folder = Path(path).resolve()
    if folder not in SEARCH_DIRS:
        # before the repository root, which stays the last resort
        at = SEARCH_DIRS.index(REPO_ROOT) if REPO_ROOT in SEARCH_DIRS else len(SEARCH_DIRS)
        SEARCH_DIRS.insert(at, folder)


def gz_variants(path: Path) -> list[Path]:
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
        for candidate in (gz_variants(base / path) if gz else [base / path]):
            if candidate.exists():
                return candidate
    return None


def search_description(path: str | os.PathLike, extra_dirs: Sequence = ()) -> str:
    """Where ``resolve_source`` looked, for an error message."""
    if Path(path).is_absolute():
        return str(path)
    places = [str(Path.cwd()), *map(str, extra_dirs), *map(str, SEARCH_DIRS)]
    return f"{path} (looked in {', '.join(dict.fromkeys(places))})"


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, gunzipped when it is a gzip stream."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise NetEngineError(f"file not found: {path}") from None
    except OSError as err:
        raise NetEngineError(f"cannot read {path}: {err.strerror or err}") from None
    if data[:2] == _GZIP_MAGIC:
        with reading(path, lead="corrupt gzip data"):  # zlib.error, EOFError, BadGzipFile, ...
            data = gzip.decompress(data)
    return data
