"""The one exception family users see: a single line naming file, line, layer and expectation."""
from __future__ import annotations


class NetEngineError(Exception):
    """A problem with a user's net, solver, weights or data, described in one line.

    ``str(err)`` is ``file:line:column: layer 'name' (Type): message`` with whatever parts are
    known; the fields stay available for tools and tests.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, layer: str | None = None,
                 layer_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.layer = layer
        self.layer_type = layer_type

    @property
    def detail(self) -> str:
        """The message with this error's own file (and line) in front: what an outer error
        (a layer of a prototxt reading a data file) quotes."""
        if not self.file or str(self.file) in self.message:
            return self.message
        line = f":{self.line}" if self.line else ""
        return f"{self.file}{line}: {self.message}"

    def inside(self, **context) -> NetEngineError:
        """Place this error inside an outer location (e.g. a layer of a prototxt): a file of
        its own (a data file, weights) moves into the message, so that the outer file's line
        is never put after it. Returns self."""
        outer = context.get("file")
        if self.file and outer and str(self.file) != str(outer):
            self.message = self.detail
            self.file = self.line = self.column = None
        return self.with_context(**context)

    def with_context(self, **context) -> NetEngineError:
        """Fill in the parts of the location that are still unknown; returns self."""
        for key, value in context.items():
            if getattr(self, key, None) is None and value is not None:
                setattr(self, key, value)
        return self

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = str(self.file)
            if self.line:
                where += f":{self.line}"
                if self.column:
                    where += f":{self.column}"
            where += ": "
        who = ""
        if self.layer is not None or self.layer_type is not None:
            who = f"layer '{self.layer or ''}'"
            if self.layer_type:
                who += f" ({self.layer_type})"
            who += ": "
        return (where + who + self.message).replace("\n", " ")


class NetSyntaxError(NetEngineError):
    """A prototxt or binary file that does not parse."""


class LayerError(NetEngineError):
    """A layer refusing its parameters, bottoms or shapes."""


class DataSourceError(LayerError):
    """A data layer whose source (file, folder or Python module) cannot be found."""


class FileWriteError(NetEngineError, OSError):
    """A file that cannot be written; an OSError too (``errno``, ``strerror``, ``filename`` =
    the file asked for), so both kinds of handler catch it."""

    def __init__(self, path, err: OSError) -> None:
        super().__init__(f"cannot write {path}: {err.strerror or err}")
        self.errno, self.strerror, self.filename = err.errno, err.strerror, str(path)


class SolverError(NetEngineError):
    """A solver file or solver state that cannot be used."""


# -- the file boundary ----------------------------------------------------------------------------
# What a damaged file raises from the decoders we lean on: the standard library's (zlib, gzip,
# struct, unicode), NumPy's shape errors on garbage headers, and the optional libraries' own
# families (h5py raises plain KeyError/TypeError/... too, lmdb its lmdb.Error, protobuf its
# DecodeError). They are matched by class here so that this module imports nothing heavy.
_DECODE_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, LookupError,
                  RuntimeError, ArithmeticError, AttributeError, MemoryError)
_LIBRARY_MODULES = ("h5py", "lmdb", "plyvel", "google.protobuf", "zlib", "gzip", "struct",
                    "PIL")


def _is_decode_error(err: BaseException) -> bool:
    if isinstance(err, NetEngineError):
        return False
    if isinstance(err, _DECODE_ERRORS):
        return True
    module = type(err).__module__ or ""
    return any(module == name or module.startswith(name + ".") for name in _LIBRARY_MODULES)


def describe(err: BaseException) -> str:
    """A library error as a short phrase (its first line, or its class name when empty)."""
    text = str(err).strip().splitlines()
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if isinstance(err, KeyError) and text:
        return f"missing entry {text[0]}"
    return text[0] if text else type(err).__name__


class reading:  # noqa: N801 - used as ``with reading(path, "HDF5 weights"):``
    """Context manager at a file boundary: any decoding failure of the damaged or hostile
    file ``path`` becomes ``cls("cannot read <what>: <reason>", file=path)`` (``lead``
    replaces "cannot read <what>"). The engine's own
    errors pass through, named after the file when they name no file yet."""

    def __init__(self, path, what: str = "file", cls: type[NetEngineError] = NetEngineError,
                 lead: str | None = None) -> None:
        self.path, self.cls = str(path), cls
        self.lead = lead or f"cannot read {what}"

    def __enter__(self) -> reading:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None:
            return False
        if isinstance(err, NetEngineError):
            if err.file is None and self.path not in err.message:
                err.file = self.path
            return False
        if not _is_decode_error(err):
            return False
        raise self.cls(f"{self.lead}: {describe(err)} (the file is damaged, truncated or not "
                       "of this kind)", file=self.path) from err
