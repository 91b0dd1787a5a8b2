"""MembershipService: not served yet; every method answers UNIMPLEMENTED."""

from __future__ import annotations

from typing import Any

import grpc
from agentpost.environments.v1 import member_pb2_grpc

from service.domain.errors import Unimplemented
from service.domain.runtime import Runtime


class MembershipServicer(member_pb2_grpc.MembershipServiceServicer):  # type: ignore[misc]
    """gRPC face of MembershipService."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def CreateMember(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("CreateMember is not implemented yet")

    async def GetMember(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("GetMember is not implemented yet")

    async def ListMembers(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("ListMembers is not implemented yet")

    async def UpdateMember(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("UpdateMember is not implemented yet")

    async def DeleteMember(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("DeleteMember is not implemented yet")

    async def AddEnvironmentMember(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("AddEnvironmentMember is not implemented yet")

    async def ListEnvironmentMembers(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("ListEnvironmentMembers is not implemented yet")

    async def UpdateEnvironmentMember(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("UpdateEnvironmentMember is not implemented yet")

    async def RemoveEnvironmentMember(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("RemoveEnvironmentMember is not implemented yet")

    async def ListMemberEnvironments(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("ListMemberEnvironments is not implemented yet")
