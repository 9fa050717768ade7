"""Reading and writing Caffe's files: prototxt text with positions, binary protos, atomic writes.

Text parse errors become one-line NetSyntaxErrors with file:line:column and, where the line lies
inside a ``layer { }`` block, that layer's name and type.
"""
from __future__ import annotations

import difflib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import message as pb_message
from google.protobuf import text_format

from netengine.errors import FileWriteError, NetEngineError, NetSyntaxError, reading

_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|[{}<>]|[A-Za-z_]\w*')
_NAME = re.compile(r'\bname\s*:\s*"([^"]*)"')
_TYPE = re.compile(r'\btype\s*:\s*"?([A-Za-z_0-9]+)"?')
_UNKNOWN_FIELD = re.compile(r'Message type "caffe\.(\w+)" has no field named "(\w+)"')
_UNKNOWN_VALUE = re.compile(r'Enum type "caffe\.([\w.]+)" has no value named (\w+)')


@dataclass
class LayerBlock:
    """Where a top-level ``layer {`` / ``layers {`` block sits in a prototxt."""

    keyword: str
    line: int
    end_line: int
    start: int = 0
    end: int = 0


@dataclass
class SourceMap:
    """The file a message came from and the line of each of its layer blocks (in order)."""

    file: str | None = None
    blocks: list[LayerBlock] = field(default_factory=list)

    def lines(self, keyword: str) -> list[int]:
        return [b.line for b in self.blocks if b.keyword == keyword]


def layer_blocks(text: str) -> list[LayerBlock]:
    """The top-level ``layer``/``layers`` blocks of a NetParameter text, in file order."""
    blocks: list[LayerBlock] = []
    depth, pending, open_block = 0, None, None
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token[0] in "#\"'":
            continue
        if token in "{<":
            if depth == 0 and pending is not None:
                open_block = LayerBlock(pending[0], pending[1], pending[1], pending[2])
            depth += 1
            pending = None
        elif token in "}>":
            depth -= 1
            if depth == 0 and open_block is not None:
                open_block.end = match.end()
                open_block.end_line = text.count("\n", 0, match.end()) + 1
                blocks.append(open_block)
                open_block = None
        elif depth == 0:
            pending = ((token, text.count("\n", 0, match.start()) + 1, match.start())
                       if token in ("layer", "layers") else None)
    return blocks


def _block_at(text: str, line: int) -> tuple[str | None, str | None]:
    """Name and type of the layer block that contains ``line``, if any."""
    for block in layer_blocks(text):
        if block.line <= line <= block.end_line:
            body = text[block.start:block.end]
            name, kind = _NAME.search(body), _TYPE.search(body)
            return (name.group(1) if name else None, kind.group(1) if kind else None)
    return None, None


def open_blocks(text: str, offset: int | None = None) -> list[tuple[str, int]]:
    """``(keyword, line)`` of each ``keyword {`` block still open at ``offset`` (default: the
    end of the text), outermost first."""
    stack: list[tuple[str, int]] = []
    previous = ""
    for match in _TOKEN.finditer(text, 0, len(text) if offset is None else offset):
        token = match.group()
        if token[0] in "#\"'":
            previous = ""
            continue
        if token in "{<":
            stack.append((previous or token, text.count("\n", 0, match.start()) + 1))
        elif token in "}>":
            if stack:
                stack.pop()
        previous = token
    return stack


def _offset(text: str, line: int, column: int) -> int:
    """The character offset of 1-based ``line``/``column`` (protobuf's error position)."""
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    return starts[min(line, len(starts)) - 1] + max(column - 1, 0)


def _unclosed(text: str, err: text_format.ParseError) -> NetSyntaxError | None:
    """Where a brace is missing: protobuf reports the end of the file (``Expected "}"``) or the
    next ``layer {``, which it reads as an unknown field of the unclosed layer."""
    message = str(err)
    line, column = err.GetLine(), err.GetColumn()
    at_end = 'Expected "}"' in message or 'Expected ">"' in message
    found = _UNKNOWN_FIELD.search(message)
    stray_layer = found is not None and found.group(2) in ("layer", "layers")
    if not (at_end or stray_layer) or not line:
        return None
    stack = open_blocks(text, None if at_end else _offset(text, line, column))
    if not stack:
        return None
    keyword, opened = stack[0]
    where = "the end of the file" if at_end else f"line {line}"
    return NetSyntaxError(f"'{keyword} {{' opened here is never closed (a '}}' is missing "
                          f"before {where})", line=opened)


def _without_echo(message: str, text: str, line: int | None) -> str:
    """protobuf's message less its copy of the source line (the file:line:column says where)."""
    lines = text.splitlines()
    if line and line <= len(lines):
        return message.replace(f"'{lines[line - 1]}': ", "", 1)
    return message


def _stray_close(text: str, err: text_format.ParseError) -> NetSyntaxError | None:
    """A ``}`` that closes no block: protobuf only says it expected a field name."""
    line, column = err.GetLine(), err.GetColumn()
    if not line or not re.search(r"got [}>]\.?$", str(err)):
        return None
    if open_blocks(text, _offset(text, line, column)):
        return None
    return NetSyntaxError("this '}' closes no block (one '}' too many, or its block's '{' is "
                          "missing)", line=line, column=column)


def _field_hint(pool, msg_type: str, name: str) -> str:
    """``did you mean 'x'?`` for a misspelt field: the nearest field of the same message, or the
    sub-message that holds a field of exactly that name (num_output -> convolution_param)."""
    try:
        descriptor = pool.FindMessageTypeByName(f"caffe.{msg_type}")
    except KeyError:
        return ""
    names = [f.name for f in descriptor.fields]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    holders = [f.name for f in descriptor.fields if f.message_type is not None
               and name in f.message_type.fields_by_name][:3]
    if holders:
        return f"; did you mean {' or '.join(f'{h} {{ {name} }}' for h in holders)}?"
    return ""


def _describe_parse_error(message: str, pool=None) -> str:
    found = _UNKNOWN_FIELD.search(message)
    if found:
        msg_type, name = found.groups()
        hint = _field_hint(pool, msg_type, name) if pool is not None else ""
        return (f"BVLC Caffe's {msg_type} has no field '{name}' (a misspelling, or a field "
                f"from a Caffe fork){hint}")
    found = _UNKNOWN_VALUE.search(message)
    if found and pool is not None:
        return _enum_hint(pool, *found.groups())
    return re.sub(r"^\d+:\d+\s*:\s*", "", message)


def _enum_hint(pool, enum_type: str, value: str) -> str:
    """An unknown enum value (``pool: MAXX``, ``phase: TESTING``) and the values there are."""
    try:
        names = [v.name for v in pool.FindEnumTypeByName(f"caffe.{enum_type}").values]
    except KeyError:
        names = []
    close = difflib.get_close_matches(value.upper(), names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"BVLC Caffe's {enum_type} has no value '{value}'; {hint}"
            f"the values are {', '.join(names)}")


def parse_text(text: str, message: pb_message.Message, file: str | None = None):
    """Merge prototxt ``text`` into ``message``; syntax errors become NetSyntaxError."""
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as err:
        braces = _unclosed(text, err) or _stray_close(text, err)
        if braces is not None:
            raise braces.with_context(file=file) from None
        line, column = err.GetLine(), err.GetColumn()
        name, kind = _block_at(text, line) if line else (None, None)
        described = _describe_parse_error(_without_echo(str(err), text, line),
                                          message.DESCRIPTOR.file.pool)
        raise NetSyntaxError(described, file=file, line=line, column=column, layer=name,
                             layer_type=kind) from None
    return message


def read_text_file(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NetEngineError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise NetEngineError(f"{path} is a binary file (a .caffemodel or .solverstate?), not "
                             "the text prototxt expected here") from None
    except OSError as err:
        raise NetEngineError(f"cannot read {path}: {err.strerror or err}") from None


def read_text_proto(path: str | os.PathLike, message: pb_message.Message):
    """Parse a prototxt file into ``message``; returns (message, SourceMap)."""
    text = read_text_file(path)
    parse_text(text, message, str(path))
    return message, SourceMap(str(path), layer_blocks(text))


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise NetEngineError(f"file not found: {path}") from None
    except OSError as err:  # a folder, no permission, ...
        raise NetEngineError(f"cannot read {path}: {err.strerror or err}") from None


def read_binary_proto(path: str | os.PathLike, message: pb_message.Message):
    """Parse a binary proto file (caffemodel, solverstate, binaryproto) into ``message``."""
    data = _read_bytes(path)
    # DecodeError, and whatever else a hostile byte string provokes in the decoder
    with reading(path, cls=NetSyntaxError,
                 lead=f"not a valid binary {message.DESCRIPTOR.name} ({len(data)} bytes)"):
        message.ParseFromString(data)
    return message


def read_proto(path: str | os.PathLike, message: pb_message.Message):
    """Binary or text, whichever the file is (Caffe's ReadProtoFromBinaryFile fallback)."""
    data = _read_bytes(path)
    try:
        message.ParseFromString(data)
        return message
    except Exception:  # noqa: BLE001 - not binary (DecodeError or worse): try it as text
        message.Clear()
    return parse_text(data.decode("utf-8", errors="replace"), message, str(path))


_GROUPS: list[list[tuple[str, Path]]] = []  # open atomic_group()s: (temporary, target) pairs


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of the new.

    The bytes go to a temporary file in the same folder, are flushed to disk, then renamed
    over ``path``: a crash or kill at any moment never leaves a truncated file. Inside
    :func:`atomic_group` the rename waits for the end of the group.
    """
    path = Path(path)
    tmp = _write_temporary(path, data.encode("utf-8") if isinstance(data, str) else data)
    if _GROUPS:
        _GROUPS[-1].append((tmp, path))
        return
    _commit(tmp, path)


def temporary_prefix(path: str | os.PathLike) -> str:
    """The name every temporary file for ``path`` starts with (hidden, in the same folder)."""
    return f".{Path(path).name}."


def _write_temporary(path: Path, payload: bytes) -> str:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp",
                                   dir=path.parent)
    except OSError as err:  # name the file asked for, not the temporary one
        raise FileWriteError(path, err) from None
    try:
        # mkstemp creates 0600 files; snapshots get the usual permissions instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as err:
        _unlink(tmp)
        if isinstance(err, OSError):
            raise FileWriteError(path, err) from None
        raise
    return tmp


def _commit(tmp: str, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as err:
        _unlink(tmp)
        raise FileWriteError(path, err) from None
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextmanager
def atomic_group() -> Iterator[None]:
    """Files written with :func:`write_atomic` inside the block are all written to temporary
    files first and renamed into place only when the block ends, in the order written: a kill
    before that leaves none of them changed (e.g. a snapshot's caffemodel and solverstate,
    the state renamed last). On an error the temporaries are removed."""
    group: list[tuple[str, Path]] = []
    _GROUPS.append(group)
    try:
        yield
    except BaseException:
        for tmp, _ in group:
            _unlink(tmp)
        raise
    finally:
        _GROUPS.remove(group)
    for k, (tmp, path) in enumerate(group):
        try:
            _commit(tmp, path)
        except BaseException:
            for later, _ in group[k + 1:]:
                _unlink(later)
            raise


def write_binary_proto(path: str | os.PathLike, message: pb_message.Message) -> None:
    write_atomic(path, message.SerializeToString())


def write_text_proto(path: str | os.PathLike, message: pb_message.Message) -> None:
    write_atomic(path, text_format.MessageToString(message))


__all__ = ["LayerBlock", "SourceMap", "atomic_group", "layer_blocks", "parse_text",
           "read_binary_proto", "read_proto", "read_text_file", "read_text_proto",
           "temporary_prefix", "write_atomic", "write_binary_proto", "write_text_proto"]
