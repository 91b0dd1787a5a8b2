"""EnvironmentService: translation only."""

from __future__ import annotations

import grpc
from agentpost.environments.v1 import environment_pb2, environment_pb2_grpc

from service.application.environments import Environments
from service.transport import context, convert


class EnvironmentServicer(environment_pb2_grpc.EnvironmentServiceServicer):
    """gRPC face of the environment use cases."""

    def __init__(self, environments: Environments) -> None:
        self._environments = environments

    async def CreateEnvironment(
        self, request: environment_pb2.CreateEnvironmentRequest, _context: grpc.aio.ServicerContext
    ) -> environment_pb2.Environment:
        env = await self._environments.create(
            context.principal(), request.name, request.slug, request.description, request.request_id
        )
        return convert.environment(env)

    async def GetEnvironment(
        self, request: environment_pb2.GetEnvironmentRequest, _context: grpc.aio.ServicerContext
    ) -> environment_pb2.Environment:
        env = self._environments.get(context.principal(), environment_id=request.id, slug=request.slug)
        return convert.environment(env)

    async def ListEnvironments(
        self, request: environment_pb2.ListEnvironmentsRequest, _context: grpc.aio.ServicerContext
    ) -> environment_pb2.ListEnvironmentsResponse:
        page = self._environments.list(
            context.principal(), request.page_size, request.page_token, request.show_deleted
        )
        return environment_pb2.ListEnvironmentsResponse(
            environments=[convert.environment(env) for env in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateEnvironment(
        self, request: environment_pb2.UpdateEnvironmentRequest, _context: grpc.aio.ServicerContext
    ) -> environment_pb2.Environment:
        given = request.environment
        env = await self._environments.update(
            context.principal(),
            given.id,
            {"name": given.name, "description": given.description},
            convert.update_mask(request.update_mask, given),
            given.etag,
        )
        return convert.environment(env)

    async def DeleteEnvironment(
        self, request: environment_pb2.DeleteEnvironmentRequest, _context: grpc.aio.ServicerContext
    ) -> environment_pb2.Environment:
        return convert.environment(
            await self._environments.delete(context.principal(), request.id, request.etag)
        )

    async def UndeleteEnvironment(
        self, request: environment_pb2.UndeleteEnvironmentRequest, _context: grpc.aio.ServicerContext
    ) -> environment_pb2.Environment:
        return convert.environment(
            await self._environments.undelete(context.principal(), request.id, request.etag)
        )
