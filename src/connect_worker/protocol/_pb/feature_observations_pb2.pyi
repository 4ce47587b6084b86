from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OTelProviderSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OTEL_PROVIDER_SOURCE_UNSPECIFIED: _ClassVar[OTelProviderSource]
    OTEL_PROVIDER_SOURCE_FIRST_PARTY: _ClassVar[OTelProviderSource]
    OTEL_PROVIDER_SOURCE_USER_PROVIDED: _ClassVar[OTelProviderSource]
    OTEL_PROVIDER_SOURCE_LEGACY_SDK: _ClassVar[OTelProviderSource]

class OTelSetupPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OTEL_SETUP_PATH_UNSPECIFIED: _ClassVar[OTelSetupPath]
    OTEL_SETUP_PATH_EXTEND_EXISTING_PROVIDER: _ClassVar[OTelSetupPath]
    OTEL_SETUP_PATH_LEGACY_CREATE_PROVIDER: _ClassVar[OTelSetupPath]

class OTelSetupFailure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OTEL_SETUP_FAILURE_UNSPECIFIED: _ClassVar[OTelSetupFailure]
    OTEL_SETUP_FAILURE_NO_PROVIDER: _ClassVar[OTelSetupFailure]
    OTEL_SETUP_FAILURE_NOT_ADDED: _ClassVar[OTelSetupFailure]
    OTEL_SETUP_FAILURE_PROVIDER_CREATION_FAILED: _ClassVar[OTelSetupFailure]
    OTEL_SETUP_FAILURE_UNKNOWN_ERROR: _ClassVar[OTelSetupFailure]

class AIMetadataExtractionReadinessReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AI_METADATA_EXTRACTION_READINESS_REASON_UNSPECIFIED: _ClassVar[AIMetadataExtractionReadinessReason]
    AI_METADATA_EXTRACTION_READINESS_REASON_READY: _ClassVar[AIMetadataExtractionReadinessReason]
    AI_METADATA_EXTRACTION_READINESS_REASON_DISABLED_BY_USER: _ClassVar[AIMetadataExtractionReadinessReason]
    AI_METADATA_EXTRACTION_READINESS_REASON_OTEL_PROVIDER_MISSING: _ClassVar[AIMetadataExtractionReadinessReason]
    AI_METADATA_EXTRACTION_READINESS_REASON_OTEL_SPAN_PROCESSOR_NOT_ADDED: _ClassVar[AIMetadataExtractionReadinessReason]

class ExtendedTracesReadinessReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXTENDED_TRACES_READINESS_REASON_UNSPECIFIED: _ClassVar[ExtendedTracesReadinessReason]
    EXTENDED_TRACES_READINESS_REASON_READY: _ClassVar[ExtendedTracesReadinessReason]
    EXTENDED_TRACES_READINESS_REASON_NOT_ENABLED_BY_USER: _ClassVar[ExtendedTracesReadinessReason]
    EXTENDED_TRACES_READINESS_REASON_DISABLED_BY_USER: _ClassVar[ExtendedTracesReadinessReason]
    EXTENDED_TRACES_READINESS_REASON_OTEL_PROVIDER_MISSING: _ClassVar[ExtendedTracesReadinessReason]
    EXTENDED_TRACES_READINESS_REASON_OTEL_SPAN_PROCESSOR_NOT_ADDED: _ClassVar[ExtendedTracesReadinessReason]
    EXTENDED_TRACES_READINESS_REASON_OTEL_PROVIDER_CREATION_FAILED: _ClassVar[ExtendedTracesReadinessReason]

class ExtendedTracesBehavior(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXTENDED_TRACES_BEHAVIOR_UNSPECIFIED: _ClassVar[ExtendedTracesBehavior]
    EXTENDED_TRACES_BEHAVIOR_EXTEND_PROVIDER: _ClassVar[ExtendedTracesBehavior]
    EXTENDED_TRACES_BEHAVIOR_OFF: _ClassVar[ExtendedTracesBehavior]
    EXTENDED_TRACES_BEHAVIOR_AUTO: _ClassVar[ExtendedTracesBehavior]
    EXTENDED_TRACES_BEHAVIOR_CREATE_PROVIDER: _ClassVar[ExtendedTracesBehavior]
    EXTENDED_TRACES_BEHAVIOR_UNKNOWN: _ClassVar[ExtendedTracesBehavior]

class SendEventsReadinessReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEND_EVENTS_READINESS_REASON_UNSPECIFIED: _ClassVar[SendEventsReadinessReason]
    SEND_EVENTS_READINESS_REASON_READY: _ClassVar[SendEventsReadinessReason]
    SEND_EVENTS_READINESS_REASON_EVENT_KEY_MISSING: _ClassVar[SendEventsReadinessReason]
OTEL_PROVIDER_SOURCE_UNSPECIFIED: OTelProviderSource
OTEL_PROVIDER_SOURCE_FIRST_PARTY: OTelProviderSource
OTEL_PROVIDER_SOURCE_USER_PROVIDED: OTelProviderSource
OTEL_PROVIDER_SOURCE_LEGACY_SDK: OTelProviderSource
OTEL_SETUP_PATH_UNSPECIFIED: OTelSetupPath
OTEL_SETUP_PATH_EXTEND_EXISTING_PROVIDER: OTelSetupPath
OTEL_SETUP_PATH_LEGACY_CREATE_PROVIDER: OTelSetupPath
OTEL_SETUP_FAILURE_UNSPECIFIED: OTelSetupFailure
OTEL_SETUP_FAILURE_NO_PROVIDER: OTelSetupFailure
OTEL_SETUP_FAILURE_NOT_ADDED: OTelSetupFailure
OTEL_SETUP_FAILURE_PROVIDER_CREATION_FAILED: OTelSetupFailure
OTEL_SETUP_FAILURE_UNKNOWN_ERROR: OTelSetupFailure
AI_METADATA_EXTRACTION_READINESS_REASON_UNSPECIFIED: AIMetadataExtractionReadinessReason
AI_METADATA_EXTRACTION_READINESS_REASON_READY: AIMetadataExtractionReadinessReason
AI_METADATA_EXTRACTION_READINESS_REASON_DISABLED_BY_USER: AIMetadataExtractionReadinessReason
AI_METADATA_EXTRACTION_READINESS_REASON_OTEL_PROVIDER_MISSING: AIMetadataExtractionReadinessReason
AI_METADATA_EXTRACTION_READINESS_REASON_OTEL_SPAN_PROCESSOR_NOT_ADDED: AIMetadataExtractionReadinessReason
EXTENDED_TRACES_READINESS_REASON_UNSPECIFIED: ExtendedTracesReadinessReason
EXTENDED_TRACES_READINESS_REASON_READY: ExtendedTracesReadinessReason
EXTENDED_TRACES_READINESS_REASON_NOT_ENABLED_BY_USER: ExtendedTracesReadinessReason
EXTENDED_TRACES_READINESS_REASON_DISABLED_BY_USER: ExtendedTracesReadinessReason
EXTENDED_TRACES_READINESS_REASON_OTEL_PROVIDER_MISSING: ExtendedTracesReadinessReason
EXTENDED_TRACES_READINESS_REASON_OTEL_SPAN_PROCESSOR_NOT_ADDED: ExtendedTracesReadinessReason
EXTENDED_TRACES_READINESS_REASON_OTEL_PROVIDER_CREATION_FAILED: ExtendedTracesReadinessReason
EXTENDED_TRACES_BEHAVIOR_UNSPECIFIED: ExtendedTracesBehavior
EXTENDED_TRACES_BEHAVIOR_EXTEND_PROVIDER: ExtendedTracesBehavior
EXTENDED_TRACES_BEHAVIOR_OFF: ExtendedTracesBehavior
EXTENDED_TRACES_BEHAVIOR_AUTO: ExtendedTracesBehavior
EXTENDED_TRACES_BEHAVIOR_CREATE_PROVIDER: ExtendedTracesBehavior
EXTENDED_TRACES_BEHAVIOR_UNKNOWN: ExtendedTracesBehavior
SEND_EVENTS_READINESS_REASON_UNSPECIFIED: SendEventsReadinessReason
SEND_EVENTS_READINESS_REASON_READY: SendEventsReadinessReason
SEND_EVENTS_READINESS_REASON_EVENT_KEY_MISSING: SendEventsReadinessReason

class FeatureObservations(_message.Message):
    __slots__ = ("ai_metadata_extraction", "extended_traces", "send_events")
    AI_METADATA_EXTRACTION_FIELD_NUMBER: _ClassVar[int]
    EXTENDED_TRACES_FIELD_NUMBER: _ClassVar[int]
    SEND_EVENTS_FIELD_NUMBER: _ClassVar[int]
    ai_metadata_extraction: AIMetadataExtraction
    extended_traces: ExtendedTraces
    send_events: SendEvents
    def __init__(self, ai_metadata_extraction: _Optional[_Union[AIMetadataExtraction, _Mapping]] = ..., extended_traces: _Optional[_Union[ExtendedTraces, _Mapping]] = ..., send_events: _Optional[_Union[SendEvents, _Mapping]] = ...) -> None: ...

class OTelSetup(_message.Message):
    __slots__ = ("path", "provider_found", "provider_source", "add_span_processor_attempted", "span_processor_added", "failure")
    PATH_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FOUND_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ADD_SPAN_PROCESSOR_ATTEMPTED_FIELD_NUMBER: _ClassVar[int]
    SPAN_PROCESSOR_ADDED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    path: OTelSetupPath
    provider_found: bool
    provider_source: OTelProviderSource
    add_span_processor_attempted: bool
    span_processor_added: bool
    failure: OTelSetupFailure
    def __init__(self, path: _Optional[_Union[OTelSetupPath, str]] = ..., provider_found: _Optional[bool] = ..., provider_source: _Optional[_Union[OTelProviderSource, str]] = ..., add_span_processor_attempted: _Optional[bool] = ..., span_processor_added: _Optional[bool] = ..., failure: _Optional[_Union[OTelSetupFailure, str]] = ...) -> None: ...

class AIMetadataExtraction(_message.Message):
    __slots__ = ("readiness_reason", "otel_setup")
    READINESS_REASON_FIELD_NUMBER: _ClassVar[int]
    OTEL_SETUP_FIELD_NUMBER: _ClassVar[int]
    readiness_reason: AIMetadataExtractionReadinessReason
    otel_setup: OTelSetup
    def __init__(self, readiness_reason: _Optional[_Union[AIMetadataExtractionReadinessReason, str]] = ..., otel_setup: _Optional[_Union[OTelSetup, _Mapping]] = ...) -> None: ...

class ExtendedTraces(_message.Message):
    __slots__ = ("readiness_reason", "config", "otel_setup")
    READINESS_REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    OTEL_SETUP_FIELD_NUMBER: _ClassVar[int]
    readiness_reason: ExtendedTracesReadinessReason
    config: ExtendedTracesConfig
    otel_setup: OTelSetup
    def __init__(self, readiness_reason: _Optional[_Union[ExtendedTracesReadinessReason, str]] = ..., config: _Optional[_Union[ExtendedTracesConfig, _Mapping]] = ..., otel_setup: _Optional[_Union[OTelSetup, _Mapping]] = ...) -> None: ...

class ExtendedTracesConfig(_message.Message):
    __slots__ = ("behavior",)
    BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    behavior: ExtendedTracesBehavior
    def __init__(self, behavior: _Optional[_Union[ExtendedTracesBehavior, str]] = ...) -> None: ...

class SendEvents(_message.Message):
    __slots__ = ("readiness_reason", "config")
    READINESS_REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    readiness_reason: SendEventsReadinessReason
    config: SendEventsConfig
    def __init__(self, readiness_reason: _Optional[_Union[SendEventsReadinessReason, str]] = ..., config: _Optional[_Union[SendEventsConfig, _Mapping]] = ...) -> None: ...

class SendEventsConfig(_message.Message):
    __slots__ = ("event_key_configured", "event_api_origin_override_configured")
    EVENT_KEY_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    EVENT_API_ORIGIN_OVERRIDE_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    event_key_configured: bool
    event_api_origin_override_configured: bool
    def __init__(self, event_key_configured: _Optional[bool] = ..., event_api_origin_override_configured: _Optional[bool] = ...) -> None: ...
