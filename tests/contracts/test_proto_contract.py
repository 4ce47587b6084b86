"""Our connect.proto against the copy shipped inside the installed inngest SDK.

Everything the SDK's schema defines (messages, fields, enums, enum values) must exist in
ours with the same wire shape, so an SDK upgrade that changes the wire format fails here,
with every difference listed at once. Ours may be ahead of the SDK by exactly the known
extras below (newer server fields the Python SDK 0.5.19 does not have). A byte-level check
then serializes with one set of classes and parses with the other, both ways.
"""

from __future__ import annotations

import warnings
from typing import Any

from google.protobuf import descriptor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from connect_worker.protocol import pb


def _import_sdk_pb2() -> Any:
    # Importing any inngest.connect module imports the whole SDK, which triggers pydantic
    # deprecation warnings (errors under filterwarnings=error) that are not ours to fix.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from inngest.connect._internal import connect_pb2

    return connect_pb2


sdk_pb2 = _import_sdk_pb2()

FieldProto = descriptor_pb2.FieldDescriptorProto

# What ours has that the SDK's does not, with the shape it must have.
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
    problems = []
    for key, shape in sorted(theirs.items()):
        if key not in mine:
            problems.append(f"missing in ours: {key} ({shape})")
        elif mine[key] != shape:
            problems.append(f"differs: {key}\n    sdk:  {shape}\n    ours: {mine[key]}")
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
