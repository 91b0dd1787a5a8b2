"""ResourceService: translation only."""

from __future__ import annotations

import grpc
from agentpost.environments.v1 import resource_pb2, resource_pb2_grpc
from google.protobuf import empty_pb2

from service.application.resources import ResourceRef, Resources
from service.transport import context, convert, enums


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    """gRPC face of the scoped-resource use cases."""

    def __init__(self, resources: Resources) -> None:
        self._resources = resources

    async def RegisterResource(
        self, request: resource_pb2.RegisterResourceRequest, _context: grpc.aio.ServicerContext
    ) -> resource_pb2.ScopedResource:
        resource = await self._resources.register(
            context.principal(),
            enums.resource_kind("kind", request.kind),
            request.resource_id,
            request.display_name,
            request.request_id,
        )
        return convert.scoped_resource(resource)

    async def GetResource(
        self, request: resource_pb2.GetResourceRequest, _context: grpc.aio.ServicerContext
    ) -> resource_pb2.ScopedResource:
        resource = await self._resources.get(
            context.principal(), enums.resource_kind("kind", request.kind), request.resource_id
        )
        return convert.scoped_resource(resource)

    async def ListResources(
        self, request: resource_pb2.ListResourcesRequest, _context: grpc.aio.ServicerContext
    ) -> resource_pb2.ListResourcesResponse:
        page = await self._resources.list(
            context.principal(),
            enums.resource_kind("kind", request.kind),
            request.page_size,
            request.page_token,
        )
        return resource_pb2.ListResourcesResponse(
            resources=[convert.scoped_resource(item) for item in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeregisterResource(
        self, request: resource_pb2.DeregisterResourceRequest, _context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._resources.deregister(
            context.principal(), enums.resource_kind("kind", request.kind), request.resource_id
        )
        return empty_pb2.Empty()

    async def ListOrphanedResources(
        self, request: resource_pb2.ListOrphanedResourcesRequest, _context: grpc.aio.ServicerContext
    ) -> resource_pb2.ListOrphanedResourcesResponse:
        page = await self._resources.list_orphaned(
            context.principal(), request.environment_id, request.page_size, request.page_token
        )
        return resource_pb2.ListOrphanedResourcesResponse(
            resources=[convert.scoped_resource(item) for item in page.items],
            next_page_token=page.next_page_token,
        )

    async def ReassignResources(
        self, request: resource_pb2.ReassignResourcesRequest, _context: grpc.aio.ServicerContext
    ) -> resource_pb2.ReassignResourcesResponse:
        moved = await self._resources.reassign(
            context.principal(),
            request.from_environment_id,
            request.to_environment_id,
            [
                ResourceRef(enums.resource_kind(f"resources[{index}].kind", ref.kind), ref.resource_id)
                for index, ref in enumerate(request.resources)
            ],
        )
        return resource_pb2.ReassignResourcesResponse(moved_count=moved)
