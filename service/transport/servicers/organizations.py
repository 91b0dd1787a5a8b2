"""OrganizationService: translation only."""

from __future__ import annotations

import grpc
from agentpost.environments.v1 import organization_pb2, organization_pb2_grpc

from service.application.organizations import Organizations
from service.transport import context, convert


class OrganizationServicer(organization_pb2_grpc.OrganizationServiceServicer):
    """gRPC face of the organization use cases."""

    def __init__(self, organizations: Organizations) -> None:
        self._organizations = organizations

    async def CreateOrganization(
        self, request: organization_pb2.CreateOrganizationRequest, _context: grpc.aio.ServicerContext
    ) -> organization_pb2.CreateOrganizationResponse:
        created = await self._organizations.create(
            request.name, request.owner_email, request.owner_display_name, request.request_id
        )
        return organization_pb2.CreateOrganizationResponse(
            organization=convert.organization(created.organization),
            default_environment=convert.environment(created.default_environment),
            owner=convert.member(created.owner),
            owner_api_key=convert.api_key(
                created.owner_api_key, now=created.organization.create_time, last_used_time=None
            ),
            owner_api_key_secret=created.owner_api_key_secret,
        )

    async def GetOrganization(
        self, request: organization_pb2.GetOrganizationRequest, _context: grpc.aio.ServicerContext
    ) -> organization_pb2.Organization:
        return convert.organization(self._organizations.get(context.principal()))
