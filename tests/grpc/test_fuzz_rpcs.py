"""Property-based fuzz of every RPC of the four services (issue #14 item 10).

Requests are generated from the proto descriptors (``clients/clinisynth/v1/*_pb2.py``): each
method's input message is walked field by field and filled by type — strings (free text, known
model / class names, hostile store keys), numbers (extremes, NaN / Inf), unknown enum values,
nested messages, repeated and map fields, oneofs — and every bytes field draws from a corpus of
malformed PNG / JPEG / DICOM (truncated, bit-flipped, unknown VRs, huge declared sizes, a small
deflated DICOM that inflates about 1000-fold) besides random bytes. Each request goes to the real
running service (real gRPC, real Triton); the property: no reply is INTERNAL or UNKNOWN, and
every service still answers health SERVING afterwards.

Bounds, so the whole fuzz takes a few minutes on 2 cores (nothing is skipped):

* deterministic: ``derandomize=True``, no example database; ``max_examples`` per RPC below;
* every call has a deadline (``CALL_TIMEOUT_S``): work that starts (a generation, a
  counterfactual) is cancelled by it, and DEADLINE_EXCEEDED is an acceptable outcome;
* fields that size long work (steps, image counts, candidates) are drawn small, with one huge
  value among them so validation of the limit is exercised too;
* a CreateJob that is accepted is cancelled at once (no training runs), and every job left is
  cancelled when the module ends;
* client-streaming RPCs (ScoreStream, UploadDatasetFile) get 1–3 generated messages; server
  streams are read to their end or until ``MAX_STREAM_EVENTS``, then cancelled;
* the services run on a private copy of the session store, so fuzzed writes (any key an RPC
  accepts) never reach the store the other test modules use.
"""

from __future__ import annotations

import functools
import io
import shutil
import struct
import zlib
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from clinisynth.v1 import common_pb2, counterfactual_pb2, finetune_pb2, generator_pb2, reward_pb2
from tests.unit.test_deid_profile import identified_dicom

pytestmark = pytest.mark.stack

CALL_TIMEOUT_S = 20.0
MAX_STREAM_EVENTS = 50
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
MODULES = {
    "generator": generator_pb2,
    "reward": reward_pb2,
    "counterfactual": counterfactual_pb2,
    "finetune": finetune_pb2,
}
#: Generated examples per RPC, on top of the seeded requests that put every entry of the
#: malformed-image corpus into every image-bearing RPC (as ``dicom`` and as ``encoded``): more
#: where inputs are images, fewer where calls start model work.
EXAMPLES = {
    "default": 12,
    "Score": 20,
    "SubmitFeedback": 20,
    "EnqueueReview": 15,
    "CreateCounterfactual": 15,
    "CounterfactualStream": 6,
    "GenerateStream": 6,
    "Generate": 10,
    "CounterfactualBatch": 6,
    "ScoreStream": 12,
}
#: Integer fields that size model work: small, plus one value far over any limit.
WORK_FIELDS = {
    "steps",
    "num_images",
    "best_of_n",
    "max_candidates",
    "max_steps",
    "limit",
    "batch_size",
    "raters_per_item",
    "preview_every",
    "width",
    "height",
    "n",
}
CELL_CLASSES = ["lymphocyte", "neutrophil", "eosinophil", "monocyte"]
NAMES = [
    "cells-tiny",
    "fundus-tiny",
    "chest-tiny",
    "fuzz-reward",
    "blob-denoiser",
    "blob-robust",
    "blob-plain",
    "lesion",
    "healthy",
    *CELL_CLASSES,
    "diffusion_pretrain",
    "reward_model",
    "classifier",
    "text_to_image_adaptation",
    "ddim",
    "ddpm",
    "png",
]
KEYS = [
    "datasets/fuzz/a.png",
    "feedback/records/x.json",
    "catalog/evil/000001.json",
    "../../etc/passwd",
    "/abs/key",
    "datasets/",
    "a//b",
    "feedback/images/",
    "exports/x",
    "counterfactuals/",
    "\x00",
    "datasets/fuzz",
]


# ---------------------------------------------------------------------------------------------
# malformed image corpus
# ---------------------------------------------------------------------------------------------


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width × height, with a tiny (short) IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _flip(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for i in rng.integers(0, len(out), size=max(1, len(out) // 50)):
        out[int(i)] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _dicom_variant(size: int = 16, **changes: Any) -> bytes:
    import pydicom

    data, _ = identified_dicom(size)
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deflated_bomb() -> bytes:
    """Deflated Explicit VR Little Endian: ~35 KB on the wire, 32 MiB of pixels inflated."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data, _ = identified_dicom(16)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = ds.Columns = 4096
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = b"\x00" * (4096 * 4096 * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _bad_vr(data: bytes, tag: bytes) -> bytes:
    at = data.index(tag) + len(tag)
    return data[:at] + b"ZZ" + data[at + 2 :]


@functools.cache
def image_corpus() -> list[bytes]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    rgb = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    png, jpeg = _png(gray), _jpeg(rgb)
    dicom = _dicom_variant(16)
    return [
        png,
        _png(rgb),
        _png(np.zeros((32, 32), np.uint8)),
        jpeg,
        png[: len(png) // 2],
        jpeg[: len(jpeg) // 2],
        _flip(png, 1),
        _flip(jpeg, 2),
        _png_declaring(65535, 65535),
        _png_declaring(0, 16),
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff" + b"\x00" * 20,
        dicom,
        dicom[: len(dicom) // 2],
        dicom[:132],
        _flip(dicom, 3),
        _flip(dicom, 4),
        _bad_vr(dicom, b"\x08\x00\x60\x00"),
        _bad_vr(dicom, b"\x28\x00\x10\x00"),
        _bad_vr(dicom, b"\x28\x00\x04\x00"),
        _bad_vr(dicom, b"\xe0\x7f\x10\x00"),
        _dicom_variant(16, Rows=65535, Columns=65535),
        _dicom_variant(16, NumberOfFrames=100000),
        _dicom_variant(16, BitsAllocated=64, BitsStored=64, HighBit=63),
        _dicom_variant(16, PhotometricInterpretation="YBR_FULL", SamplesPerPixel=3),
        _dicom_variant(16, WindowWidth=0, WindowCenter="nan"),
        _dicom_variant(16, RescaleSlope="inf"),
        _dicom_variant(16, BurnedInAnnotation="YES"),
        _deflated_bomb(),
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff",
        b"",
        b"GIF89a" + b"\x00" * 20,
    ]


# ---------------------------------------------------------------------------------------------
# requests from descriptors
# ---------------------------------------------------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalar(field: FieldDescriptor, corpus: list[bytes]) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(
            st.sampled_from(NAMES + KEYS),
            st.text(max_size=24),
            st.just("x" * 5000),
        )
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from(corpus), st.binary(max_size=64))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if t == FieldDescriptor.TYPE_FLOAT else 64
        return st.one_of(
            st.floats(-2, 2, width=width),
            st.floats(width=width, allow_nan=True, allow_infinity=True),
        )
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-3, 99))
    low, high = _INT_RANGES[t]
    if field.name in WORK_FIELDS:
        return st.one_of(st.integers(max(low, -2), 6), st.just(min(high, 10**6)))
    return st.one_of(st.integers(max(low, -3), 40), st.sampled_from([low, high]))


def message(desc: Descriptor, corpus: list[bytes], depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(desc)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        if depth > 3:
            return msg
        chosen = {
            oneof.name: draw(st.sampled_from([None, *[f.name for f in oneof.fields]]))
            for oneof in desc.oneofs
        }
        for field in desc.fields:
            oneof = field.containing_oneof
            if oneof is not None and chosen[oneof.name] != field.name:
                continue  # one member per oneof, or none
            if oneof is None and not draw(st.booleans()):
                continue  # sparse: most requests leave most fields unset
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key_f = field.message_type.fields_by_name["key"]
                val_f = field.message_type.fields_by_name["value"]
                entries = draw(st.dictionaries(scalar(key_f, corpus), st.none(), max_size=3))
                for key in entries:
                    target = getattr(msg, field.name)
                    if val_f.message_type is not None:
                        target[key].CopyFrom(draw(message(val_f.message_type, corpus, depth + 1)))
                    else:
                        target[key] = draw(scalar(val_f, corpus))
                continue
            if field.label == FieldDescriptor.LABEL_REPEATED:
                if field.message_type is not None:
                    items = draw(
                        st.lists(message(field.message_type, corpus, depth + 1), max_size=3)
                    )
                    getattr(msg, field.name).extend(items)
                else:
                    getattr(msg, field.name).extend(
                        draw(st.lists(scalar(field, corpus), max_size=4))
                    )
                continue
            if field.message_type is not None:
                getattr(msg, field.name).CopyFrom(
                    draw(message(field.message_type, corpus, depth + 1))
                )
            else:
                setattr(msg, field.name, draw(scalar(field, corpus)))
        return msg

    return build()


def _holds_image(desc: Descriptor, depth: int = 0) -> bool:
    if desc.full_name == "clinisynth.v1.Image":
        return True
    return depth < 4 and any(
        f.message_type is not None and _holds_image(f.message_type, depth + 1) for f in desc.fields
    )


def seeded(desc: Descriptor, payload: bytes, kind: str) -> Any:
    """A minimal request whose every image is ``payload`` (as ``kind``) and every condition
    a known class: the hostile bytes reach the decoder instead of an earlier check."""
    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        sub = field.message_type
        if sub is None or sub.GetOptions().map_entry:
            continue
        repeated = field.label == FieldDescriptor.LABEL_REPEATED
        target = getattr(msg, field.name).add() if repeated else getattr(msg, field.name)
        if sub.full_name == "clinisynth.v1.Image":
            setattr(target, kind, payload)
        elif sub.full_name == "clinisynth.v1.Condition":
            target.class_name = "neutrophil"
        elif _holds_image(sub):
            target.CopyFrom(seeded(sub, payload, kind))
        elif repeated:
            del getattr(msg, field.name)[-1]
    if desc.full_name == "clinisynth.v1.ScoreStreamRequest":
        msg.ClearField("config")  # the image member of the oneof
    return msg


def seeded_requests(method: MethodDescriptor, corpus: list[bytes]) -> list[list[Any]]:
    """Every corpus entry, as ``dicom`` and as ``encoded``, in every image of the request."""
    if not _holds_image(method.input_type):
        return []
    out = []
    for payload in corpus:
        for kind in ("dicom", "encoded"):
            request = seeded(method.input_type, payload, kind)
            if method.name == "ScoreStream":
                config = reward_pb2.ScoreStreamRequest(
                    config=reward_pb2.ScoreStreamConfig(
                        condition=common_pb2.Condition(class_name="neutrophil")
                    )
                )
                out.append([config, request])
            else:
                out.append([request])
    return out


def all_rpcs() -> list[tuple[str, MethodDescriptor]]:
    return [
        (service, method)
        for service, module in MODULES.items()
        for svc in module.DESCRIPTOR.services_by_name.values()
        for method in svc.methods
    ]


RPCS = all_rpcs()


# ---------------------------------------------------------------------------------------------
# the running services, on a private copy of the store
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_stack(
    triton_server,
    triton_client,
    store_url,
    session_dir,
    model_repository,
    registered_models,
    cf_models,
    tmp_path_factory,
):
    from clinisynth_server import registry
    from clinisynth_server.catalog import Catalog
    from clinisynth_server.methods.reward_model import RewardModel, RewardModelConfig
    from clinisynth_server.reward.scoring import write_reward_folder
    from clinisynth_server.store import open_store
    from tests.conftest import start_service

    home = tmp_path_factory.mktemp("fuzz")
    fuzz_store_url = str(home / "store")
    shutil.copytree(store_url, fuzz_store_url)
    fuzz_store = open_store(fuzz_store_url)
    # An untrained reward model: Score then decodes and scores (its values do not matter).
    folder = write_reward_folder(
        RewardModel(RewardModelConfig(num_classes=4, in_channels=1, backbone_width=4)),
        home / "reward",
        classes=CELL_CLASSES,
        width=16,
        labels={"domain": "cells"},
    )
    registry.register_folder(
        folder,
        "fuzz-reward",
        catalog=Catalog(fuzz_store, ttl_s=0.0),
        store=fuzz_store,
        model_repository=model_repository,
        triton=triton_client,
        max_batch_size=16,
    )
    url = triton_server.grpc_url
    running = {
        "generator": start_service("generator", url, fuzz_store_url, home / "g"),
        "reward": start_service("reward", url, fuzz_store_url, home / "r"),
        "counterfactual": start_service(
            "counterfactual",
            url,
            fuzz_store_url,
            home / "c",
            model_repository=str(model_repository),
        ),
        "finetune": start_service(
            "finetune",
            url,
            fuzz_store_url,
            home / "f",
            max_concurrent_jobs="1",
            workdir=str(home / "work"),
            poll_s="0.2",
            torch_threads="1",
            model_repository=str(model_repository),
        ),
    }
    channels = {name: grpc.insecure_channel(r.address) for name, r in running.items()}
    yield channels
    _cancel_all_jobs(channels["finetune"])
    for channel in channels.values():
        channel.close()
    for r in running.values():
        r.stop(0)


def _cancel_all_jobs(channel: grpc.Channel) -> None:
    from clinisynth.v1 import finetune_pb2_grpc

    stub = finetune_pb2_grpc.FinetuneServiceStub(channel)
    for job in stub.ListJobs(finetune_pb2.ListJobsRequest(page_size=1000), timeout=30).jobs:
        stub.CancelJob(finetune_pb2.CancelJobRequest(id=job.id), timeout=30)


def _call(
    channel: grpc.Channel, service: str, method: MethodDescriptor, requests: list[Any]
) -> tuple[grpc.StatusCode, str, Any]:
    """One RPC of any shape; returns (code, details, the last response or None)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    out_cls = message_factory.GetMessageClass(method.output_type)
    ser, de = (lambda m: m.SerializeToString()), out_cls.FromString
    try:
        if method.client_streaming and not method.server_streaming:
            fn = channel.stream_unary(path, request_serializer=ser, response_deserializer=de)
            return grpc.StatusCode.OK, "", fn(iter(requests), timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            if method.client_streaming:  # ScoreStream: the generated messages, then read
                fn = channel.stream_stream(path, request_serializer=ser, response_deserializer=de)
                stream = fn(iter(requests), timeout=CALL_TIMEOUT_S)
            else:
                fn = channel.unary_stream(path, request_serializer=ser, response_deserializer=de)
                stream = fn(requests[0], timeout=CALL_TIMEOUT_S)
            last = None
            for count, last in enumerate(stream):  # noqa: B007
                if count >= MAX_STREAM_EVENTS:
                    stream.cancel()
                    break
            return grpc.StatusCode.OK, "", last
        fn = channel.unary_unary(path, request_serializer=ser, response_deserializer=de)
        return grpc.StatusCode.OK, "", fn(requests[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def _describe(requests: list[Any]) -> str:
    from google.protobuf import text_format

    text = " | ".join(text_format.MessageToString(r, as_one_line=True) for r in requests)
    return text[:600]


@pytest.mark.parametrize(("service", "method"), RPCS, ids=[f"{s}.{m.name}" for s, m in RPCS])
def test_no_request_is_internal_or_unknown(fuzz_stack, service: str, method: MethodDescriptor):
    corpus = list(image_corpus())
    channel = fuzz_stack[service]
    strategy = message(method.input_type, corpus)
    requests_st = (
        st.lists(strategy, min_size=1, max_size=3)
        if method.client_streaming
        else strategy.map(lambda m: [m])
    )
    findings: list[str] = []
    for requests in seeded_requests(method, corpus):  # every hostile image, deterministically
        code, details, _ = _call(channel, service, method, requests)
        if code in BAD_CODES:
            findings.append(f"{code.name}: {details!r} for {_describe(requests)}")

    @settings(
        max_examples=EXAMPLES.get(method.name, EXAMPLES["default"]),
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(requests_st)
    def run(requests: list[Any]) -> None:
        code, details, response = _call(channel, service, method, requests)
        if code in BAD_CODES:
            findings.append(f"{code.name}: {details!r} for {_describe(requests)}")
        if method.name == "CreateJob" and response is not None and response.id:
            _cancel_all_jobs(fuzz_stack["finetune"])  # accepted: cancel before it trains

    run()
    assert not findings, "\n".join(findings[:10])


def test_services_serving_after_the_fuzz(fuzz_stack):
    """Runs last in the module (pytest keeps file order): every service still SERVING."""
    for name, channel in fuzz_stack.items():
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
