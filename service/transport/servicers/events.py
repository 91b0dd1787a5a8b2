"""EventService: translation only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from agentpost.environments.v1 import event_pb2, event_pb2_grpc

from service.application.events import EventFilters, Events
from service.domain.errors import InvalidArgument
from service.domain.events import ResourceType
from service.transport import context, convert, enums


class EventServicer(event_pb2_grpc.EventServiceServicer):
    """gRPC face of the audit log and the change stream."""

    def __init__(self, events: Events) -> None:
        self._events = events

    async def ListEvents(
        self, request: event_pb2.ListEventsRequest, _context: grpc.aio.ServicerContext
    ) -> event_pb2.ListEventsResponse:
        filters = EventFilters(
            environment_id=request.environment_id,
            resource_type=enums.resource_type("resource_type", request.resource_type),
            resource_id=request.resource_id,
            actor_api_key_id=request.actor_api_key_id,
            start_time=convert.to_datetime("start_time", request.start_time)
            if request.HasField("start_time")
            else None,
            end_time=convert.to_datetime("end_time", request.end_time)
            if request.HasField("end_time")
            else None,
        )
        page = await self._events.list(context.principal(), filters, request.page_size, request.page_token)
        return event_pb2.ListEventsResponse(
            events=[convert.event(item) for item in page.items], next_page_token=page.next_page_token
        )

    async def WatchEvents(
        self, request: event_pb2.WatchEventsRequest, _context: grpc.aio.ServicerContext
    ) -> AsyncIterator[event_pb2.WatchEventsResponse]:
        types = [
            _required_type(f"resource_types[{index}]", number)
            for index, number in enumerate(request.resource_types)
        ]
        stream = self._events.watch(context.principal(), context.credential(), request.after_revision, types)
        async with aclosing(stream):
            async for batch in stream:
                yield event_pb2.WatchEventsResponse(
                    events=[convert.event(item) for item in batch.events], revision=batch.revision
                )


def _required_type(field: str, number: int) -> ResourceType:
    """A resource type a watch is limited to; unspecified names none."""
    resource_type = enums.resource_type(field, number)
    if resource_type is None:
        raise InvalidArgument.field(field, "must name a resource type")
    return resource_type
