"""Generate docs/layers.md, the layer reference, from the layer registry and the schema.

For every registered type: its bottom/top counts (the class's declared ``exact_``/``min_``/
``max_`` attributes), the ``*_param`` messages it reads with each field's type, default and the
schema's comment, and the class docstring (formula and Caffe's quirks). Nothing is written by
hand, so the page cannot drift from the code: ``tests/test_docs.py`` regenerates it in memory
and fails when docs/layers.md differs. Regenerate with ``tools/gen_layer_docs``.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from netengine import net_spec
from netengine.formats.prototxt import write_atomic
from netengine.layers import REGISTRY, layer_type_list
from netengine.layers.base import FORK_LAYER_TYPES
from netengine.proto import caffe_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = REPO_ROOT / "docs" / "layers.md"
PROTO_PATH = REPO_ROOT / "proto" / "caffe.proto"
REGENERATE = "python tools/gen_layer_docs"

_LAYER = caffe_pb2.LayerParameter.DESCRIPTOR
_FIELD_LINE = re.compile(r"^(?:optional|repeated|required)\s+([\w.]+)\s+(\w+)\s*=\s*\d+")
_BLOCK = re.compile(r"^(message|enum)\s+(\w+)\s*\{")
_TYPE_NAMES = {}


def _type_names() -> dict[int, str]:
    if not _TYPE_NAMES:
        fd = _LAYER.fields[0]
        for name in dir(fd):
            if name.startswith("TYPE_"):
                _TYPE_NAMES[getattr(fd, name)] = name[5:].lower()
    return _TYPE_NAMES


# -- comments from the schema -------------------------------------------------------------------
def proto_comments(path: Path = PROTO_PATH) -> dict[tuple[str, str], str]:
    """``{(message path, field or enum value name): comment}`` from caffe.proto's ``//`` lines.

    A field's comment is the block of comment lines right above it plus a trailing comment.
    """
    if not path.exists():
        return {}
    comments: dict[tuple[str, str], str] = {}
    stack: list[str] = []
    pending: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        code, _, trailing = line.partition("//")
        code = code.strip()
        if not code:
            if line.startswith("//"):
                text = trailing.strip()
                if text and not set(text) <= set("-="):
                    pending.append(text)
            else:
                pending = []
            continue
        block = _BLOCK.match(code)
        if block:
            stack.append(block.group(2))
            pending = []
            continue
        if code.startswith("}"):
            if stack:
                stack.pop()
            pending = []
            continue
        field = _FIELD_LINE.match(code)
        value = re.match(r"^(\w+)\s*=\s*-?\d+\s*;", code)
        name = field.group(2) if field else value.group(1) if value else None
        if name and stack:
            text = " ".join(pending + ([trailing.strip()] if trailing.strip() else []))
            if text:
                comments[(".".join(stack), name)] = text
        pending = []
    return comments


# -- one field, one message -----------------------------------------------------------------------
def _message_path(descriptor) -> str:
    return descriptor.full_name.split(".", 1)[1] if "." in descriptor.full_name else \
        descriptor.full_name


def _format_default(field) -> str:
    if field.is_repeated or field.message_type is not None:
        return "—"
    if field.type == field.TYPE_ENUM:
        value = field.enum_type.values_by_number[field.default_value].name
        return f"`{value}`" if field.has_default_value else f"unset (`{value}`)"
    value = field.default_value
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:.7g}"
    elif isinstance(value, str):
        text = f'"{value}"'
    else:
        text = str(value)
    return f"`{text}`" if field.has_default_value else f"unset (`{text}`)"


def _format_type(field) -> str:
    if field.message_type is not None:
        text = _message_path(field.message_type)
    elif field.type == field.TYPE_ENUM:
        values = ", ".join(v.name for v in field.enum_type.values)
        text = f"enum {field.enum_type.name} ({values})"
    else:
        text = _type_names().get(field.type, "?")
    return f"repeated {text}" if field.is_repeated else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def message_table(descriptor, comments: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """A Markdown table of a message's fields: name, type, default, comment."""
    path = _message_path(descriptor)
    lines = ["| field | type | default | notes |", "| --- | --- | --- | --- |"]
    for field in descriptor.fields:
        if field.name in skip:
            continue
        note = comments.get((path, field.name), "")
        if field.type == field.TYPE_ENUM:
            enum_path = _message_path(field.enum_type)
            values = [f"`{v.name}`: {comments[(enum_path, v.name)]}"
                      for v in field.enum_type.values if (enum_path, v.name) in comments]
            note = " ".join([note] + values).strip()
        lines.append(f"| `{field.name}` | {_cell(_format_type(field))} | "
                     f"{_cell(_format_default(field))} | {_cell(note)} |")
    return lines


# -- one layer type -------------------------------------------------------------------------------
def counts(cls, which: str) -> str:
    """'exactly 1', '2 to 3', 'at least 1', 'any' from the class's declared blob counts."""
    exact, low, high = (getattr(cls, f"{kind}_{which}s") for kind in ("exact", "min", "max"))
    if exact is not None:
        text = f"exactly {exact}"
    elif low is not None and high is not None:
        text = f"{low} to {high}"
    elif low is not None:
        text = f"at least {low}"
    elif high is not None:
        text = f"at most {high}"
    else:
        text = "any number"
    if which == "top" and cls.equal_bottom_top:
        text += ", as many as bottoms"
    return text


def _code_names(klass) -> set[str]:
    """Attribute and global names used by the code of a class's own methods (nested too)."""
    names: set[str] = set()
    todo = []
    for value in vars(klass).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            todo += [f.__code__ for f in (value.fget, value.fset) if f is not None]
        elif hasattr(value, "__code__"):
            todo.append(value.__code__)
    while todo:
        code = todo.pop()
        names.update(code.co_names)
        todo += [c for c in code.co_consts if hasattr(c, "co_names")]
    return names


def layer_params(type_name: str, cls) -> list[str]:
    """The LayerParameter message fields a type reads: its own ``<type>_param`` and shared
    ones (netspec's routing), plus any other ``*_param`` its class's methods use."""
    fields = list(net_spec.param_fields(type_name))
    message_fields = {f.name for f in _LAYER.fields
                      if f.message_type is not None and f.name.endswith("_param")}
    for klass in cls.__mro__:
        if klass.__module__.startswith("netengine.layers") and klass.__name__ != "Layer":
            used = _code_names(klass) & message_fields
            fields += sorted(used - set(fields))
    return fields


def _docstring(cls) -> str:
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else "*(no docstring)*"


def _anchor(name: str) -> str:
    return name.lower()


def layer_section(type_name: str, cls, comments: dict, shared: set) -> list[str]:
    family = cls.__module__.rsplit(".", 1)[-1]
    kind = [base.__name__ for base in cls.__mro__[1:]
            if base.__name__ in ("NeuronLayer", "LossLayer")]
    facts = [f"bottoms: {counts(cls, 'bottom')}", f"tops: {counts(cls, 'top')}"]
    if kind == ["NeuronLayer"]:
        facts.append("element-wise, may run in place")
    if kind == ["LossLayer"]:
        facts.append("loss layer (loss_weight 1 on its first top unless given)")
    if not cls.allows_inplace:
        facts.append("refuses in-place (top == bottom)")
    if cls.auto_top_blobs:
        facts.append("unnamed tops are created automatically")
    lines = [f"## {type_name}", "",
             f"`netengine/layers/{family}.py` · class `{cls.__name__}` · " + " · ".join(facts),
             "", _docstring(cls), ""]
    for field_name in layer_params(type_name, cls):
        descriptor = _LAYER.fields_by_name[field_name].message_type
        lines += [f"**`{field_name}`** ({descriptor.name})", ""]
        lines += message_table(descriptor, comments) + [""]
        for field in descriptor.fields:
            if field.message_type is not None:
                shared.add(field.message_type.full_name)
    return lines


# -- the page -------------------------------------------------------------------------------------
def _common_section(comments: dict, shared: set) -> list[str]:
    skip = tuple(f.name for f in _LAYER.fields if f.name.endswith("_param"))
    for field in _LAYER.fields:
        if field.name not in skip and field.message_type is not None:
            shared.add(field.message_type.full_name)
    return ["## Fields every layer has", "",
            "Every `layer { }` block is a LayerParameter; besides its type's `*_param` "
            "messages it takes:", ""] + message_table(_LAYER, comments, skip) + [""]


def _shared_messages(comments: dict, shared: set) -> list[str]:
    """Messages used inside the tables above (FillerParameter, BlobShape, ParamSpec...)."""
    layer_params_ = {f.message_type.full_name for f in _LAYER.fields
                     if f.name.endswith("_param") and f.message_type is not None}
    done: set[str] = set()
    lines = ["## Messages used by the fields above", ""]
    todo = sorted(shared)
    while todo:
        full_name = todo.pop(0)
        if full_name in done or full_name in layer_params_ or \
                full_name == "caffe.BlobProto":
            continue
        done.add(full_name)
        descriptor = caffe_pb2.DESCRIPTOR.message_types_by_name.get(full_name.split(".")[-1])
        if descriptor is None:
            continue
        lines += [f"### {descriptor.name}", ""] + message_table(descriptor, comments) + [""]
        todo += sorted(f.message_type.full_name for f in descriptor.fields
                       if f.message_type is not None)
    return lines


def shipped_types() -> list[str]:
    """Registered types implemented in netengine/layers (not ones that tests or user code
    registered at run time)."""
    return [name for name in layer_type_list()
            if REGISTRY[name].__module__.startswith("netengine.layers.")]


def generate() -> str:
    """The Markdown text of docs/layers.md."""
    comments = proto_comments()
    types = shipped_types()
    shared: set[str] = set()
    lines = ["# Layer reference", "",
             f"<!-- Generated by `{REGENERATE}` from the layer registry "
             "(netengine/layers) and the schema (proto/caffe.proto). Do not edit by hand. -->",
             "",
             f"netengine implements {len(types)} BVLC Caffe layer types. Each section gives the "
             "type's bottom and top blob counts, the formula and Caffe's quirks (from the "
             "layer's docstring), and every field of the `*_param` messages it reads with its "
             "default. \"unset\" means the field has no default in the schema: the layer "
             "checks whether it was given (the value in parentheses is what protobuf reports "
             "when it was not).", "",
             "| type | bottoms | tops | parameters |", "| --- | --- | --- | --- |"]
    for name in types:
        cls = REGISTRY[name]
        params = ", ".join(f"`{p}`" for p in layer_params(name, cls)) or "—"
        lines.append(f"| [{name}](#{_anchor(name)}) | {counts(cls, 'bottom')} | "
                     f"{counts(cls, 'top')} | {params} |")
    lines.append("")
    lines += _common_section(comments, shared)
    for name in types:
        lines += layer_section(name, REGISTRY[name], comments, shared)
    lines += _shared_messages(comments, shared)
    lines += ["## Types from Caffe forks", "",
              "These types appear in published prototxt files but BVLC Caffe has no such layer; "
              "netengine refuses them with a one-line error naming the fork:", "",
              "| type | from |", "| --- | --- |"]
    lines += [f"| {name} | {fork} |" for name, fork in sorted(FORK_LAYER_TYPES.items())]
    return "\n".join(lines).rstrip() + "\n"


def write(path: Path = DOC_PATH) -> Path:
    write_atomic(path, generate())
    return path
