"""Our connect.proto against the schemas inside both official SDKs.

Python: the descriptor of the installed ``inngest`` package. TypeScript: the code ts-proto
generated into the npm ``inngest`` package of tests/contracts/ts (read by ts_schema.py).
Everything either SDK's schema defines (messages, fields, enums, enum values) must exist in
ours with the same wire shape, so an SDK upgrade that changes the wire format fails here,
with every difference listed at once; and ours is exactly the union of the two, nothing
more. A byte-level check then serializes with our classes and the Python SDK's, both ways.
"""

from __future__ import annotations

import warnings
from typing import Any

from google.protobuf import descriptor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from connect_worker.protocol import pb

from ..missing import missing
from . import ts_schema


def _import_sdk_pb2() -> Any:
    # Importing any inngest.connect module imports the whole SDK, which triggers pydantic
    # deprecation warnings (errors under filterwarnings=error) that are not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from inngest.connect._internal import connect_pb2

    return connect_pb2


sdk_pb2 = _import_sdk_pb2()

FieldProto = descriptor_pb2.FieldDescriptorProto

# What ours has that the Python SDK's does not (0.5.19 and 0.5.20a0 ship the same
# connect.proto), with the shape it must have. The TypeScript SDK has each of them.
KNOWN_EXTRAS = {
    "enum value connect.v1.GatewayMessageType.WORKER_STATUS": "number=15",
    "message connect.v1.WorkerStatusData": "map_entry=False",
    "field connect.v1.WorkerStatusData.in_flight_request_ids": (
        "number=1 type=TYPE_STRING label=LABEL_REPEATED type_name= proto3_optional=False oneof="
    ),
    "field connect.v1.WorkerStatusData.shutdown_requested": (
        "number=2 type=TYPE_BOOL label=LABEL_OPTIONAL type_name= proto3_optional=False oneof="
    ),
    "field connect.v1.GatewayConnectionReadyData.status_interval": (
        "number=3 type=TYPE_STRING label=LABEL_OPTIONAL type_name= proto3_optional=False oneof="
    ),
    "field connect.v1.AppConfiguration.feature_observations": (
        "number=5 type=TYPE_MESSAGE label=LABEL_OPTIONAL"
        " type_name=.sdk_feature_observations.v1.FeatureObservations proto3_optional=False oneof="
    ),
}


def file_proto(descriptor: Any) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(descriptor.serialized_pb)


def _enum_facts(prefix: str, enum: Any, facts: dict[str, str]) -> None:
    name = f"{prefix}.{enum.name}"
    facts[f"enum {name}"] = "enum"
    for value in enum.value:
        facts[f"enum value {name}.{value.name}"] = f"number={value.number}"


def _message_facts(prefix: str, message: Any, facts: dict[str, str]) -> None:
    name = f"{prefix}.{message.name}"
    facts[f"message {name}"] = f"map_entry={message.options.map_entry}"
    for field in message.field:
        oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else ""
        facts[f"field {name}.{field.name}"] = (
            f"number={field.number} type={FieldProto.Type.Name(field.type)}"
            f" label={FieldProto.Label.Name(field.label)} type_name={field.type_name}"
            f" proto3_optional={field.proto3_optional} oneof={oneof}"
        )
    for nested in message.nested_type:
        _message_facts(name, nested, facts)
    for enum in message.enum_type:
        _enum_facts(name, enum, facts)


def schema_facts(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Every wire-relevant fact of a .proto file, keyed by what it is about."""
    prefix = proto.package
    facts = {"file": f"package={proto.package} syntax={proto.syntax}"}
    for message in proto.message_type:
        _message_facts(prefix, message, facts)
    for enum in proto.enum_type:
        _enum_facts(prefix, enum, facts)
    return facts


def schema_diff(
    sdk: descriptor_pb2.FileDescriptorProto, ours: descriptor_pb2.FileDescriptorProto
) -> tuple[list[str], dict[str, str]]:
    """(problems, extras): SDK facts missing or different in ours, and ours-only facts."""
    theirs, mine = schema_facts(sdk), schema_facts(ours)
    problems = _compare(theirs, mine)
    extras = {key: shape for key, shape in mine.items() if key not in theirs}
    return problems, extras


def test_our_schema_matches_the_sdk() -> None:
    problems, extras = schema_diff(file_proto(sdk_pb2.DESCRIPTOR), file_proto(pb.DESCRIPTOR))
    assert not problems, (
        f"{len(problems)} difference(s) between the inngest SDK's connect.proto and ours "
        "(src/connect_worker/protocol/connect.proto; regenerate with scripts/gen-proto):\n"
        + "\n".join(problems)
    )
    unexpected = {k: v for k, v in extras.items() if KNOWN_EXTRAS.get(k) != v}
    absent = sorted(set(KNOWN_EXTRAS) - set(extras))
    assert not unexpected and not absent, (
        "ours differs from the SDK beyond the known extras:\n"
        + "".join(f"  unexpected: {k} ({v})\n" for k, v in sorted(unexpected.items()))
        + "".join(f"  no longer extra (the SDK has it now, or ours lost it): {k}\n" for k in absent)
    )


def _ours_all() -> dict[str, str]:
    """Facts of our connect.proto and the feature_observations.proto it imports."""
    feature = pb.AppConfiguration.DESCRIPTOR.fields_by_name["feature_observations"]
    facts = schema_facts(file_proto(feature.message_type.file))
    facts.update(schema_facts(file_proto(pb.DESCRIPTOR)))
    del facts["file"]
    return facts


def _ts_facts_or_skip() -> dict[str, str]:
    if not ts_schema.TS_PROTO_DIR.exists():
        missing("the inngest npm package is not installed in tests/contracts/ts: "
                "run scripts/setup.d/node.sh")
    return ts_schema.ts_facts()


def _compare(theirs: dict[str, str], mine: dict[str, str]) -> list[str]:
    """SDK facts missing or different in ours."""
    problems = []
    for key, shape in sorted(theirs.items()):
        if key not in mine:
            problems.append(f"missing in ours: {key} ({shape})")
        elif mine[key] != shape:
            problems.append(f"differs: {key}\n    sdk:  {shape}\n    ours: {mine[key]}")
    return problems


def test_our_schema_matches_the_typescript_sdk() -> None:
    ts = _ts_facts_or_skip()
    problems = _compare(ts, _ours_all())
    assert not problems, (
        f"{len(problems)} difference(s) between the TypeScript SDK's schema and ours:\n"
        + "\n".join(problems)
    )


def test_our_connect_schema_is_the_union_of_both_sdks() -> None:
    ts = {k: v for k, v in _ts_facts_or_skip().items() if "sdk_feature_observations" not in k}
    python = schema_facts(file_proto(sdk_pb2.DESCRIPTOR))
    del python["file"]
    mine = schema_facts(file_proto(pb.DESCRIPTOR))
    del mine["file"]
    union = {**python, **ts}
    assert sorted(set(mine) - set(union)) == [], "ours has what neither SDK has"
    assert sorted(set(union) - set(mine)) == [], "an SDK has what ours lacks"
    # The extras over the Python SDK are what the TypeScript SDK has on top.
    assert {k: ts[k] for k in set(ts) - set(python)} == KNOWN_EXTRAS


def test_typescript_schema_reader_reads_every_field() -> None:
    # Not vacuous: as many fields as decode() cases, the known message and enum counts,
    # and a changed tag in the generated code is reported.
    _ts_facts_or_skip()
    total_cases = 0
    for rel in ts_schema.TS_FILES:
        source = (ts_schema.TS_PROTO_DIR / rel).read_text()
        total_cases += source.count("if (tag !== ")
    ts = ts_schema.ts_facts()
    assert sum(k.startswith("field ") for k in ts) == total_cases
    assert sum(k.startswith("message ") for k in ts) == 16 + 7
    assert sum(k.startswith("enum ") and " value " not in k for k in ts) == 3 + 7
    source = (ts_schema.TS_PROTO_DIR / "connect/protobuf/connect.js").read_text()
    broken = source.replace("case 8:\n\t\t\t\t\tif (tag !== 66) break;\n\t\t\t\t\t"
                            "message.retryAfter", "case 18:\n\t\t\t\t\tif (tag !== 146) "
                            "break;\n\t\t\t\t\tmessage.retryAfter")
    assert broken != source
    facts = ts_schema.file_facts(broken, "connect.v1", {})
    problems = _compare(facts, _ours_all())
    assert any("differs: field connect.v1.SDKResponse.retry_after" in p for p in problems)


def test_schema_diff_reports_every_difference() -> None:
    # The comparison itself must not be vacuous: break the SDK copy in several ways at once.
    ours = file_proto(pb.DESCRIPTOR)
    sdk = file_proto(sdk_pb2.DESCRIPTOR)
    by_name = {m.name: m for m in sdk.message_type}
    kind = next(f for f in by_name["ConnectMessage"].field if f.name == "kind")
    kind.number = 3
    status = next(f for f in by_name["SDKResponse"].field if f.name == "status")
    status.type = FieldProto.TYPE_INT32
    status.ClearField("type_name")
    apps = next(f for f in by_name["WorkerConnectRequestData"].field if f.name == "apps")
    apps.label = FieldProto.LABEL_OPTIONAL
    step_id = next(f for f in by_name["GatewayExecutorRequestData"].field if f.name == "step_id")
    step_id.proto3_optional = False
    new = by_name["SDKResponse"].field.add()
    new.CopyFrom(FieldProto(name="trace_id", number=99, type=FieldProto.TYPE_STRING))
    new.label = FieldProto.LABEL_OPTIONAL
    sdk.enum_type[0].value.add(name="GATEWAY_NEW_THING", number=42)
    sdk.message_type.add(name="BrandNew")

    problems, _ = schema_diff(sdk, ours)
    text = "\n".join(problems)
    for needle in (
        "differs: field connect.v1.ConnectMessage.kind",
        "differs: field connect.v1.SDKResponse.status",
        "differs: field connect.v1.WorkerConnectRequestData.apps",
        "differs: field connect.v1.GatewayExecutorRequestData.step_id",
        "missing in ours: field connect.v1.SDKResponse.trace_id",
        "missing in ours: enum value connect.v1.GatewayMessageType.GATEWAY_NEW_THING",
        "missing in ours: message connect.v1.BrandNew",
    ):
        assert needle in text, f"{needle!r} not reported in:\n{text}"
    assert len(problems) == 7


def test_both_schemas_load_in_one_process_without_sharing_a_pool() -> None:
    assert pb.DESCRIPTOR.pool is not sdk_pb2.DESCRIPTOR.pool
    assert pb.ConnectMessage is not sdk_pb2.ConnectMessage
    assert pb.ConnectMessage.DESCRIPTOR.full_name == sdk_pb2.ConnectMessage.DESCRIPTOR.full_name


# --- byte-level interop ---------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=20)
_blob = st.binary(max_size=40)
_int32 = st.integers(-(2**31), 2**31 - 1)
_int64 = st.integers(-(2**63), 2**63 - 1)

EXECUTOR_REQUEST = st.fixed_dictionaries(
    {
        "request_id": _text,
        "account_id": _text,
        "env_id": _text,
        "app_id": _text,
        "app_name": _text,
        "function_id": _text,
        "function_slug": _text,
        "request_payload": _blob,
        "system_trace_ctx": _blob,
        "user_trace_ctx": _blob,
        "run_id": _text,
        "lease_id": _text,
        "job_id": _text,
    },
    optional={"step_id": _text},
)
SDK_RESPONSE = st.fixed_dictionaries(
    {
        "request_id": _text,
        "account_id": _text,
        "env_id": _text,
        "app_id": _text,
        "status": st.sampled_from([0, 1, 2]),
        "body": _blob,
        "no_retry": st.booleans(),
        "sdk_version": _text,
        "request_version": st.integers(0, 2**32 - 1),
        "system_trace_ctx": _blob,
        "user_trace_ctx": _blob,
        "run_id": _text,
    },
    optional={"retry_after": _text},
)
WORKER_CONNECT = st.fixed_dictionaries(
    {
        "connection_id": _text,
        "instance_id": _text,
        "auth_data": st.fixed_dictionaries({"session_token": _text, "sync_token": _text}),
        "capabilities": _blob,
        "apps": st.lists(
            st.fixed_dictionaries(
                {"app_name": _text, "functions": _blob}, optional={"app_version": _text}
            ),
            max_size=3,
        ),
        "worker_manual_readiness_ack": st.booleans(),
        "system_attributes": st.fixed_dictionaries(
            {"cpu_cores": _int32, "mem_bytes": _int64, "os": _text}
        ),
        "framework": _text,
        "sdk_version": _text,
        "sdk_language": _text,
    },
    optional={
        "environment": _text,
        "platform": _text,
        "started_at": st.fixed_dictionaries(
            {"seconds": st.integers(0, 253402300799), "nanos": st.integers(0, 999_999_999)}
        ),
        "max_worker_concurrency": _int64,
    },
)

INTEROP = settings(max_examples=100, deadline=None)


def check_interop(name: str, fields: dict[str, Any]) -> None:
    ours_cls, sdk_cls = getattr(pb, name), getattr(sdk_pb2, name)
    ours, theirs = ours_cls(**fields), sdk_cls(**fields)
    ours_bytes = ours.SerializeToString(deterministic=True)
    sdk_bytes = theirs.SerializeToString(deterministic=True)
    assert ours_bytes == sdk_bytes
    # What we send, the SDK-shaped peer reads back unchanged (presence included), and back.
    assert sdk_cls.FromString(ours_bytes) == theirs
    assert ours_cls.FromString(sdk_bytes) == ours
    for field in ours_cls.DESCRIPTOR.fields:
        if field.has_presence:
            assert sdk_cls.FromString(ours_bytes).HasField(field.name) == ours.HasField(field.name)


@INTEROP
@given(fields=EXECUTOR_REQUEST)
def test_interop_gateway_executor_request(fields: dict[str, Any]) -> None:
    check_interop("GatewayExecutorRequestData", fields)


@INTEROP
@given(fields=SDK_RESPONSE)
def test_interop_sdk_response(fields: dict[str, Any]) -> None:
    check_interop("SDKResponse", fields)


@INTEROP
@given(fields=WORKER_CONNECT)
def test_interop_worker_connect_request(fields: dict[str, Any]) -> None:
    check_interop("WorkerConnectRequestData", fields)


def test_sdk_reads_connection_ready_with_our_extra_status_interval() -> None:
    ours = pb.GatewayConnectionReadyData(
        heartbeat_interval="10s", extend_lease_interval="30s", status_interval="5s"
    )
    theirs = sdk_pb2.GatewayConnectionReadyData.FromString(ours.SerializeToString())
    assert (theirs.heartbeat_interval, theirs.extend_lease_interval) == ("10s", "30s")
    # ... and an envelope with our newer kind still parses on the SDK side (open enum).
    envelope = sdk_pb2.ConnectMessage.FromString(
        pb.ConnectMessage(kind=pb.GatewayMessageType.WORKER_STATUS).SerializeToString()
    )
    assert envelope.kind == 15
