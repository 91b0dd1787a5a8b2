import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApiKey(_message.Message):
    __slots__ = ("id", "organization_id", "name", "scopes", "environment_ids", "owner_member_id", "mode", "prefix", "state", "create_time", "update_time", "expire_time", "last_used_time", "revoke_time", "etag")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[ApiKey.Mode]
        LIVE: _ClassVar[ApiKey.Mode]
        DEV: _ClassVar[ApiKey.Mode]
    MODE_UNSPECIFIED: ApiKey.Mode
    LIVE: ApiKey.Mode
    DEV: ApiKey.Mode
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ApiKey.State]
        ACTIVE: _ClassVar[ApiKey.State]
        EXPIRED: _ClassVar[ApiKey.State]
        REVOKED: _ClassVar[ApiKey.State]
    STATE_UNSPECIFIED: ApiKey.State
    ACTIVE: ApiKey.State
    EXPIRED: ApiKey.State
    REVOKED: ApiKey.State
    ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    organization_id: str
    name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    environment_ids: _containers.RepeatedScalarFieldContainer[str]
    owner_member_id: str
    mode: ApiKey.Mode
    prefix: str
    state: ApiKey.State
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    last_used_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    etag: str
    def __init__(self, id: _Optional[str] = ..., organization_id: _Optional[str] = ..., name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., environment_ids: _Optional[_Iterable[str]] = ..., owner_member_id: _Optional[str] = ..., mode: _Optional[_Union[ApiKey.Mode, str]] = ..., prefix: _Optional[str] = ..., state: _Optional[_Union[ApiKey.State, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("name", "scopes", "environment_ids", "owner_member_id", "mode", "expire_time", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    environment_ids: _containers.RepeatedScalarFieldContainer[str]
    owner_member_id: str
    mode: ApiKey.Mode
    expire_time: _timestamp_pb2.Timestamp
    request_id: str
    def __init__(self, name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., environment_ids: _Optional[_Iterable[str]] = ..., owner_member_id: _Optional[str] = ..., mode: _Optional[_Union[ApiKey.Mode, str]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "secret")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    secret: str
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class GetApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("environment_id", "show_revoked", "page_size", "page_token")
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SHOW_REVOKED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    environment_id: str
    show_revoked: bool
    page_size: int
    page_token: str
    def __init__(self, environment_id: _Optional[str] = ..., show_revoked: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys", "next_page_token")
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, api_keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateApiKeyRequest(_message.Message):
    __slots__ = ("api_key", "update_mask")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("id", "etag")
    ID_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    etag: str
    def __init__(self, id: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...

class RollApiKeyRequest(_message.Message):
    __slots__ = ("id", "previous_key_ttl", "etag")
    ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_KEY_TTL_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    previous_key_ttl: _duration_pb2.Duration
    etag: str
    def __init__(self, id: _Optional[str] = ..., previous_key_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class RollApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "secret", "previous_api_key")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    secret: str
    previous_api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ..., previous_api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class VerifyApiKeyRequest(_message.Message):
    __slots__ = ("secret", "environment", "required_scopes", "min_revision")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    secret: str
    environment: str
    required_scopes: _containers.RepeatedScalarFieldContainer[str]
    min_revision: int
    def __init__(self, secret: _Optional[str] = ..., environment: _Optional[str] = ..., required_scopes: _Optional[_Iterable[str]] = ..., min_revision: _Optional[int] = ...) -> None: ...

class VerifyApiKeyResponse(_message.Message):
    __slots__ = ("valid", "denial_reason", "principal")
    class DenialReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DENIAL_REASON_UNSPECIFIED: _ClassVar[VerifyApiKeyResponse.DenialReason]
        MALFORMED: _ClassVar[VerifyApiKeyResponse.DenialReason]
        NOT_FOUND: _ClassVar[VerifyApiKeyResponse.DenialReason]
        REVOKED: _ClassVar[VerifyApiKeyResponse.DenialReason]
        EXPIRED: _ClassVar[VerifyApiKeyResponse.DenialReason]
        OWNER_REMOVED: _ClassVar[VerifyApiKeyResponse.DenialReason]
        ENVIRONMENT_NOT_FOUND: _ClassVar[VerifyApiKeyResponse.DenialReason]
        ENVIRONMENT_DELETED: _ClassVar[VerifyApiKeyResponse.DenialReason]
        ENVIRONMENT_NOT_ALLOWED: _ClassVar[VerifyApiKeyResponse.DenialReason]
        ENVIRONMENT_REQUIRED: _ClassVar[VerifyApiKeyResponse.DenialReason]
        SCOPE_MISSING: _ClassVar[VerifyApiKeyResponse.DenialReason]
    DENIAL_REASON_UNSPECIFIED: VerifyApiKeyResponse.DenialReason
    MALFORMED: VerifyApiKeyResponse.DenialReason
    NOT_FOUND: VerifyApiKeyResponse.DenialReason
    REVOKED: VerifyApiKeyResponse.DenialReason
    EXPIRED: VerifyApiKeyResponse.DenialReason
    OWNER_REMOVED: VerifyApiKeyResponse.DenialReason
    ENVIRONMENT_NOT_FOUND: VerifyApiKeyResponse.DenialReason
    ENVIRONMENT_DELETED: VerifyApiKeyResponse.DenialReason
    ENVIRONMENT_NOT_ALLOWED: VerifyApiKeyResponse.DenialReason
    ENVIRONMENT_REQUIRED: VerifyApiKeyResponse.DenialReason
    SCOPE_MISSING: VerifyApiKeyResponse.DenialReason
    VALID_FIELD_NUMBER: _ClassVar[int]
    DENIAL_REASON_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    denial_reason: VerifyApiKeyResponse.DenialReason
    principal: Principal
    def __init__(self, valid: _Optional[bool] = ..., denial_reason: _Optional[_Union[VerifyApiKeyResponse.DenialReason, str]] = ..., principal: _Optional[_Union[Principal, _Mapping]] = ...) -> None: ...

class Principal(_message.Message):
    __slots__ = ("organization_id", "api_key_id", "owner_member_id", "organization_wide", "environment_id", "environment_slug", "scopes", "allowed_environment_ids")
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_WIDE_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_SLUG_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ENVIRONMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    organization_id: str
    api_key_id: str
    owner_member_id: str
    organization_wide: bool
    environment_id: str
    environment_slug: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    allowed_environment_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, organization_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., owner_member_id: _Optional[str] = ..., organization_wide: _Optional[bool] = ..., environment_id: _Optional[str] = ..., environment_slug: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., allowed_environment_ids: _Optional[_Iterable[str]] = ...) -> None: ...
