"""The protobuf schema: committed module vs. proto/caffe.proto, and real Caffe files."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet

from netengine.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "caffe-golden" / "cases"
ACCEPTANCE = SHARED / "acceptance"
NETS = ACCEPTANCE / "nets"
WEIGHTS = ACCEPTANCE / "weights"


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.rglob(pattern)) if root.is_dir() else []


def _ids(paths: list[Path], root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in paths]


def _require(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared material not available)")


def unknown_fields(msg, where: str = "") -> list[tuple[str, int]]:
    """(path, field number) of every unknown field in msg and its sub-messages."""
    found = [(where or "<root>", f.field_number) for f in UnknownFieldSet(msg)]
    for fd, value in msg.ListFields():
        if fd.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        items = list(enumerate(value)) if fd.is_repeated else [(None, value)]
        for i, sub in items:
            name = fd.name if i is None else f"{fd.name}[{i}]"
            found += unknown_fields(sub, f"{where}.{name}" if where else name)
    return found


# ---------------------------------------------------------------------------
# (a) committed caffe_pb2.py is what proto/caffe.proto compiles to
# ---------------------------------------------------------------------------


def _normalise(file_proto: descriptor_pb2.FileDescriptorProto) -> None:
    # protoc fills json_name in --descriptor_set_out and spells float
    # defaults as written ("1e-08"); the embedded descriptor omits json_name
    # and spells them at float precision ("9.99999994e-09").  Compare values.
    def walk(message):
        for field in message.field:
            field.ClearField("json_name")
            if field.HasField("default_value") and field.type == field.TYPE_FLOAT:
                value = struct.unpack(
                    "<f", struct.pack("<f", float(field.default_value))
                )[0]
                field.default_value = repr(value)
            elif field.HasField("default_value") and field.type == field.TYPE_DOUBLE:
                field.default_value = repr(float(field.default_value))
        for nested in message.nested_type:
            walk(nested)

    for message in file_proto.message_type:
        walk(message)


def test_committed_module_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from netengine.proto import generate

    out = tmp_path / "caffe.pb"
    rc = generate._protoc().main(generate.protoc_args(f"--descriptor_set_out={out}"))
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert len(fds.file) == 1
    compiled = fds.file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(
        caffe_pb2.DESCRIPTOR.serialized_pb
    )
    _normalise(compiled)
    _normalise(committed)
    assert compiled == committed, (
        "caffe_pb2.py is stale: run python -m netengine.proto.generate"
    )
    assert compiled.SerializeToString(
        deterministic=True
    ) == committed.SerializeToString(deterministic=True)


def test_schema_landmarks():
    """A few wire facts other code relies on, and fork-only fields that must not exist."""
    net = caffe_pb2.NetParameter.DESCRIPTOR
    assert net.fields_by_name["layer"].number == 100
    assert net.fields_by_name["layers"].number == 2
    assert caffe_pb2.DESCRIPTOR.package == "caffe"

    layer = caffe_pb2.LayerParameter.DESCRIPTOR
    assert layer.fields_by_name["batch_norm_param"].number == 139
    assert layer.fields_by_name["clip_param"].number == 148
    assert layer.fields_by_name["swish_param"].number == 147
    pool = caffe_pb2.PoolingParameter()
    assert "ceil_mode" not in pool.DESCRIPTOR.fields_by_name
    assert pool.round_mode == caffe_pb2.PoolingParameter.CEIL
    assert pool.DESCRIPTOR.fields_by_name["round_mode"].number == 13

    solver = caffe_pb2.SolverParameter()
    assert solver.type == "SGD"
    assert solver.solver_mode == caffe_pb2.SolverParameter.GPU
    assert solver.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO
    assert solver.random_seed == -1 and solver.delta == pytest.approx(1e-8)
    assert solver.DESCRIPTOR.fields_by_name["layer_wise_reduce"].number == 41
    assert solver.DESCRIPTOR.fields_by_name["weights"].number == 42

    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.ParamSpec().lr_mult == 1.0
    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID
    assert caffe_pb2.V1LayerParameter.CONVOLUTION == 4
    assert caffe_pb2.V1LayerParameter.DECONVOLUTION == 39
    assert caffe_pb2.V0LayerParameter().biasterm is True
    clip = caffe_pb2.ClipParameter.DESCRIPTOR
    assert (
        clip.fields_by_name["min"].is_required
        and clip.fields_by_name["max"].is_required
    )


def test_ceil_mode_is_unknown():
    text = 'layer { name: "p" type: "Pooling" pooling_param { pool: MAX ceil_mode: false } }'
    with pytest.raises(text_format.ParseError, match="ceil_mode"):
        text_format.Merge(text, caffe_pb2.NetParameter())


# ---------------------------------------------------------------------------
# (b) binary Caffe files
# ---------------------------------------------------------------------------

GOLDEN_MODELS = _files(GOLDEN, "*.caffemodel")
GOLDEN_STATES = _files(GOLDEN, "*.solverstate")
ACCEPT_MODELS = _files(WEIGHTS, "*.caffemodel")
ACCEPT_STATES = _files(WEIGHTS, "*.solverstate")

# The MTCNN models were trained with a Caffe fork that added fields to
# SoftmaxParameter (3) and LossParameter (4).  BVLC keeps them as unknown
# fields, and so do we; these are the only ones expected.
FORK_UNKNOWN = {
    "det1.caffemodel": {("layer[15].softmax_param", 3)},
    "det2.caffemodel": {("layer[18].loss_param", 4), ("layer[19].loss_param", 4)},
    "det3.caffemodel": {("layer[23].loss_param", 4), ("layer[24].loss_param", 4)},
}


def test_golden_material_present():
    _require(GOLDEN)
    names = {p.name for p in GOLDEN_MODELS}
    assert {"lenet_init.caffemodel", "lenet_sgd_iter_40.caffemodel"} <= names
    assert GOLDEN_STATES


@pytest.mark.parametrize(
    "path",
    GOLDEN_MODELS + ACCEPT_MODELS,
    ids=_ids(GOLDEN_MODELS, GOLDEN) + _ids(ACCEPT_MODELS, WEIGHTS),
)
def test_caffemodel_parses_and_round_trips(path):
    data = path.read_bytes()
    net = caffe_pb2.NetParameter.FromString(data)
    assert len(net.layer) + len(net.layers) > 0
    assert set(unknown_fields(net)) == FORK_UNKNOWN.get(path.name, set())
    # Caffe serialises fields in number order, as protobuf does: identical bytes.
    assert net.SerializeToString() == data
    assert any(len(layer.blobs) for layer in list(net.layer) + list(net.layers))


@pytest.mark.parametrize(
    "path",
    GOLDEN_STATES + ACCEPT_STATES,
    ids=_ids(GOLDEN_STATES, GOLDEN) + _ids(ACCEPT_STATES, WEIGHTS),
)
def test_solverstate_parses_and_round_trips(path):
    data = path.read_bytes()
    state = caffe_pb2.SolverState.FromString(data)
    assert unknown_fields(state) == []
    assert state.iter > 0
    assert len(state.history) > 0
    assert state.SerializeToString() == data
    m = re.search(r"_iter_(\d+)\.solverstate$", path.name)
    if m:
        assert state.iter == int(m.group(1))


# ---------------------------------------------------------------------------
# (c) text nets and solvers
# ---------------------------------------------------------------------------

NET_FILES = _files(NETS, "*.prototxt")
_SOLVER_KEY = re.compile(r"^(base_lr|max_iter|lr_policy)\s*:", re.MULTILINE)

# Files that BVLC Caffe itself cannot parse: fork-only fields or types.
# Value: text the parse error must mention.
EXPECTED_FAILURES = {
    "alexgkendall_segnet-tutorial/Example_Models/segnet_basic_camvid.prototxt": "bn_param",
    "alexgkendall_segnet-tutorial/Example_Models/segnet_pascal.prototxt": "bn_param",
    "lim0606_caffe-googlenet-bn/deploy.prototxt": "Softmax",  # quoted V1 enum
    "lim0606_caffe-googlenet-bn/train_val.prototxt": "shuffle",  # DataParameter.shuffle
    "shicai_densenet-caffe/DenseNet_121.prototxt": "ceil_mode",
    "shicai_densenet-caffe/DenseNet_161.prototxt": "ceil_mode",
    "shicai_densenet-caffe/DenseNet_169.prototxt": "ceil_mode",
    "shicai_densenet-caffe/DenseNet_201.prototxt": "ceil_mode",
    "soeaver_caffe-model/cls/resnet/deploy_resnet18-priv.prototxt": "ceil_mode",
    "soeaver_caffe-model/cls/resnext/deploy_resnext50-32x4d.prototxt": "ceil_mode",
}
# All SegNet Models/*.prototxt use the fork's DenseImageData layer.
_SEGNET_MODELS = "alexgkendall_segnet-tutorial/Models/"


def _expected_failure(rel: str, solver: bool) -> str | None:
    if solver:
        return None
    if rel.startswith(_SEGNET_MODELS):
        return "dense_image_data_param"
    return EXPECTED_FAILURES.get(rel)


def _is_solver(text: str) -> bool:
    return bool(_SOLVER_KEY.search(text))


def test_acceptance_nets_present():
    _require(NETS)
    assert len(NET_FILES) > 100


@pytest.mark.parametrize("path", NET_FILES, ids=_ids(NET_FILES, NETS))
def test_acceptance_prototxt_parses(path):
    rel = path.relative_to(NETS).as_posix()
    text = path.read_text()
    solver = _is_solver(text)
    message = caffe_pb2.SolverParameter() if solver else caffe_pb2.NetParameter()
    expected = _expected_failure(rel, solver)
    if expected is not None:
        with pytest.raises(text_format.ParseError, match=expected):
            text_format.Merge(text, message)
        return
    text_format.Merge(text, message)
    top = rel.split("/", 1)[0]
    if isinstance(message, caffe_pb2.SolverParameter):
        assert message.HasField("base_lr") or message.HasField("max_iter")
        if top == "bvlc_caffe_legacy_solver_type":
            assert message.HasField("solver_type")
        return
    if top == "bvlc_caffe_v0format_v0.9":
        assert message.layers and all(v1.HasField("layer") for v1 in message.layers)
    elif top == "bvlc_caffe_v1format_pre_upgrade":
        assert message.layers and not message.layer
        assert all(v1.HasField("type") for v1 in message.layers)
    elif top in ("bvlc_caffe", "bvlc_caffe_v2_upgraded_e6c80dac"):
        assert not message.layers


GOLDEN_TEXT = _files(GOLDEN, "*.prototxt")


@pytest.mark.parametrize("path", GOLDEN_TEXT, ids=_ids(GOLDEN_TEXT, GOLDEN))
def test_golden_prototxt_parses(path):
    text = path.read_text()
    message = (
        caffe_pb2.SolverParameter() if _is_solver(text) else caffe_pb2.NetParameter()
    )
    text_format.Merge(text, message)
    assert message.ListFields()
