"""ResourceService: not served yet; every method answers UNIMPLEMENTED."""

from __future__ import annotations

from typing import Any

import grpc
from agentpost.environments.v1 import resource_pb2_grpc

from service.domain.errors import Unimplemented
from service.domain.runtime import Runtime


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):  # type: ignore[misc]
    """gRPC face of ResourceService."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def RegisterResource(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("RegisterResource is not implemented yet")

    async def GetResource(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("GetResource is not implemented yet")

    async def ListResources(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("ListResources is not implemented yet")

    async def DeregisterResource(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("DeregisterResource is not implemented yet")

    async def ListOrphanedResources(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("ListOrphanedResources is not implemented yet")

    async def ReassignResources(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("ReassignResources is not implemented yet")
