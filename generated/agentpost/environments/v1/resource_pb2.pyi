import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScopedResource(_message.Message):
    __slots__ = ("kind", "resource_id", "organization_id", "environment_id", "display_name", "create_time", "update_time")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ScopedResource.Kind]
        INBOX: _ClassVar[ScopedResource.Kind]
        MESSAGE: _ClassVar[ScopedResource.Kind]
        THREAD: _ClassVar[ScopedResource.Kind]
        DRAFT: _ClassVar[ScopedResource.Kind]
        DOMAIN: _ClassVar[ScopedResource.Kind]
        WEBHOOK_ENDPOINT: _ClassVar[ScopedResource.Kind]
        LABEL: _ClassVar[ScopedResource.Kind]
    KIND_UNSPECIFIED: ScopedResource.Kind
    INBOX: ScopedResource.Kind
    MESSAGE: ScopedResource.Kind
    THREAD: ScopedResource.Kind
    DRAFT: ScopedResource.Kind
    DOMAIN: ScopedResource.Kind
    WEBHOOK_ENDPOINT: ScopedResource.Kind
    LABEL: ScopedResource.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    kind: ScopedResource.Kind
    resource_id: str
    organization_id: str
    environment_id: str
    display_name: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[ScopedResource.Kind, str]] = ..., resource_id: _Optional[str] = ..., organization_id: _Optional[str] = ..., environment_id: _Optional[str] = ..., display_name: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegisterResourceRequest(_message.Message):
    __slots__ = ("kind", "resource_id", "display_name", "request_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    kind: ScopedResource.Kind
    resource_id: str
    display_name: str
    request_id: str
    def __init__(self, kind: _Optional[_Union[ScopedResource.Kind, str]] = ..., resource_id: _Optional[str] = ..., display_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetResourceRequest(_message.Message):
    __slots__ = ("kind", "resource_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    kind: ScopedResource.Kind
    resource_id: str
    def __init__(self, kind: _Optional[_Union[ScopedResource.Kind, str]] = ..., resource_id: _Optional[str] = ...) -> None: ...

class ListResourcesRequest(_message.Message):
    __slots__ = ("kind", "page_size", "page_token")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kind: ScopedResource.Kind
    page_size: int
    page_token: str
    def __init__(self, kind: _Optional[_Union[ScopedResource.Kind, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListResourcesResponse(_message.Message):
    __slots__ = ("resources", "next_page_token")
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    resources: _containers.RepeatedCompositeFieldContainer[ScopedResource]
    next_page_token: str
    def __init__(self, resources: _Optional[_Iterable[_Union[ScopedResource, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeregisterResourceRequest(_message.Message):
    __slots__ = ("kind", "resource_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    kind: ScopedResource.Kind
    resource_id: str
    def __init__(self, kind: _Optional[_Union[ScopedResource.Kind, str]] = ..., resource_id: _Optional[str] = ...) -> None: ...

class ListOrphanedResourcesRequest(_message.Message):
    __slots__ = ("environment_id", "page_size", "page_token")
    ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    environment_id: str
    page_size: int
    page_token: str
    def __init__(self, environment_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListOrphanedResourcesResponse(_message.Message):
    __slots__ = ("resources", "next_page_token")
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    resources: _containers.RepeatedCompositeFieldContainer[ScopedResource]
    next_page_token: str
    def __init__(self, resources: _Optional[_Iterable[_Union[ScopedResource, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResourceRef(_message.Message):
    __slots__ = ("kind", "resource_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    kind: ScopedResource.Kind
    resource_id: str
    def __init__(self, kind: _Optional[_Union[ScopedResource.Kind, str]] = ..., resource_id: _Optional[str] = ...) -> None: ...

class ReassignResourcesRequest(_message.Message):
    __slots__ = ("from_environment_id", "to_environment_id", "resources")
    FROM_ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_ENVIRONMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    from_environment_id: str
    to_environment_id: str
    resources: _containers.RepeatedCompositeFieldContainer[ResourceRef]
    def __init__(self, from_environment_id: _Optional[str] = ..., to_environment_id: _Optional[str] = ..., resources: _Optional[_Iterable[_Union[ResourceRef, _Mapping]]] = ...) -> None: ...

class ReassignResourcesResponse(_message.Message):
    __slots__ = ("moved_count",)
    MOVED_COUNT_FIELD_NUMBER: _ClassVar[int]
    moved_count: int
    def __init__(self, moved_count: _Optional[int] = ...) -> None: ...
