import datetime

from agentpost.environments.v1 import api_key_pb2 as _api_key_pb2
from agentpost.environments.v1 import environment_pb2 as _environment_pb2
from agentpost.environments.v1 import member_pb2 as _member_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Organization(_message.Message):
    __slots__ = ("id", "name", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateOrganizationRequest(_message.Message):
    __slots__ = ("name", "owner_email", "owner_display_name", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    OWNER_DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    owner_email: str
    owner_display_name: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., owner_email: _Optional[str] = ..., owner_display_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateOrganizationResponse(_message.Message):
    __slots__ = ("organization", "default_environment", "owner", "owner_api_key", "owner_api_key_secret")
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    OWNER_API_KEY_FIELD_NUMBER: _ClassVar[int]
    OWNER_API_KEY_SECRET_FIELD_NUMBER: _ClassVar[int]
    organization: Organization
    default_environment: _environment_pb2.Environment
    owner: _member_pb2.Member
    owner_api_key: _api_key_pb2.ApiKey
    owner_api_key_secret: str
    def __init__(self, organization: _Optional[_Union[Organization, _Mapping]] = ..., default_environment: _Optional[_Union[_environment_pb2.Environment, _Mapping]] = ..., owner: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., owner_api_key: _Optional[_Union[_api_key_pb2.ApiKey, _Mapping]] = ..., owner_api_key_secret: _Optional[str] = ...) -> None: ...

class GetOrganizationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
