import datetime

from agentpost.environments.v1 import api_key_pb2 as _api_key_pb2
from agentpost.environments.v1 import environment_pb2 as _environment_pb2
from agentpost.environments.v1 import member_pb2 as _member_pb2
from agentpost.environments.v1 import organization_pb2 as _organization_pb2
from agentpost.environments.v1 import resource_pb2 as _resource_pb2
from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("id", "organization_id", "revision", "create_time", "actor", "request_id", "action", "resource_type", "resource_id", "environment_id", "changed_fields", "organization", "environment", "member", "environment_member", "api_key", "scoped_resource")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[Event.Action]
        CREATED: _ClassVar[Event.Action]
        UPDATED: _ClassVar[Event.Action]
        DELETED: _ClassVar[Event.Action]
        UNDELETED: _ClassVar[Event.Action]
        REVOKED: _ClassVar[Event.Action]
        ROLLED: _ClassVar[Event.Action]
        ADDED: _ClassVar[Event.Action]
        REMOVED: _ClassVar[Event.Action]
        REGISTERED: _ClassVar[Event.Action]
        DEREGISTERED: _ClassVar[Event.Action]
        REASSIGNED: _ClassVar[Event.Action]
    ACTION_UNSPECIFIED: Event.Action
    CREATED: Event.Action
    UPDATED: Event.Action
    DELETED: Event.Action
    UNDELETED: Event.Action
    REVOKED: Event.Action
    ROLLED: Event.Action
    ADDED: Event.Action
    REMOVED: Event.Action
    REGISTERED: Event.Action
    DEREGISTERED: Event.Action
    REASSIGNED: Event.Action
    class ResourceType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RESOURCE_TYPE_UNSPECIFIED: _ClassVar[Event.ResourceType]
        ORGANIZATION: _ClassVar[Event.ResourceType]
        ENVIRONMENT: _ClassVar[Event.ResourceType]
        MEMBER: _ClassVar[Event.ResourceType]
        ENVIRONMENT_MEMBER: _ClassVar[Event.ResourceType]
        API_KEY: _ClassVar[Event.ResourceType]
        SCOPED_RESOURCE: _ClassVar[Event.ResourceType]
    RESOURCE_TYPE_UNSPECIFIED: Event.ResourceType
    ORGANIZATION: Event.ResourceType
    ENVIRONMENT: Event.ResourceType
    MEMBER: Event.ResourceType
    ENVIRONMENT_MEMBER: Event.ResourceType
    API_KEY: Event.ResourceType
    SCOPED_RESOURCE: Event.ResourceType
    class Actor(_message.Message):
        __slots__ = ("api_key_id", "member_id", "operator")
        API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
        MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
        OPERATOR_FIELD_NUMBER: _ClassVar[int]
        api_key_id: str
        member_id: str
        operator: bool
        def __init__(self, api_key_id: _Optional[str] = ..., member_id: _Optional[str] = ..., operator: _Optional[bool] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_MEMBER_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SCOPED_RESOURCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    organization_id: str
    revision: int
    create_time: _timestamp_pb2.Timestamp
    actor: Event.Actor
    request_id: str
    action: Event.Action
    resource_type: Event.ResourceType
    resource_id: str
    environment_id: str
    changed_fields: _containers.RepeatedScalarFieldContainer[str]
    organization: _organization_pb2.Organization
    environment: _environment_pb2.Environment
    member: _member_pb2.Member
    environment_member: _member_pb2.EnvironmentMember
    api_key: _api_key_pb2.ApiKey
    scoped_resource: _resource_pb2.ScopedResource
    def __init__(self, id: _Optional[str] = ..., organization_id: _Optional[str] = ..., revision: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[_Union[Event.Actor, _Mapping]] = ..., request_id: _Optional[str] = ..., action: _Optional[_Union[Event.Action, str]] = ..., resource_type: _Optional[_Union[Event.ResourceType, str]] = ..., resource_id: _Optional[str] = ..., environment_id: _Optional[str] = ..., changed_fields: _Optional[_Iterable[str]] = ..., organization: _Optional[_Union[_organization_pb2.Organization, _Mapping]] = ..., environment: _Optional[_Union[_environment_pb2.Environment, _Mapping]] = ..., member: _Optional[_Union[_member_pb2.Member, _Mapping]] = ..., environment_member: _Optional[_Union[_member_pb2.EnvironmentMember, _Mapping]] = ..., api_key: _Optional[_Union[_api_key_pb2.ApiKey, _Mapping]] = ..., scoped_resource: _Optional[_Union[_resource_pb2.ScopedResource, _Mapping]] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "environment_id", "resource_type", "resource_id", "actor_api_key_id", "start_time", "end_time")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    environment_id: str
    resource_type: Event.ResourceType
    resource_id: str
    actor_api_key_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., environment_id: _Optional[str] = ..., resource_type: _Optional[_Union[Event.ResourceType, str]] = ..., resource_id: _Optional[str] = ..., actor_api_key_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("after_revision", "resource_types")
    AFTER_REVISION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_TYPES_FIELD_NUMBER: _ClassVar[int]
    after_revision: int
    resource_types: _containers.RepeatedScalarFieldContainer[Event.ResourceType]
    def __init__(self, after_revision: _Optional[int] = ..., resource_types: _Optional[_Iterable[_Union[Event.ResourceType, str]]] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("events", "revision")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    revision: int
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...
