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
