"""ApiKeyService: not served yet; every method answers UNIMPLEMENTED."""

from __future__ import annotations

from typing import Any

import grpc
from agentpost.environments.v1 import api_key_pb2_grpc

from service.domain.errors import Unimplemented
from service.domain.runtime import Runtime


class ApiKeyServicer(api_key_pb2_grpc.ApiKeyServiceServicer):  # type: ignore[misc]
    """gRPC face of ApiKeyService."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def CreateApiKey(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("CreateApiKey is not implemented yet")

    async def GetApiKey(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("GetApiKey is not implemented yet")

    async def ListApiKeys(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("ListApiKeys is not implemented yet")

    async def UpdateApiKey(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("UpdateApiKey is not implemented yet")

    async def RevokeApiKey(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("RevokeApiKey is not implemented yet")

    async def RollApiKey(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("RollApiKey is not implemented yet")

    async def VerifyApiKey(self, request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented("VerifyApiKey is not implemented yet")
