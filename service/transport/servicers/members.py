"""MembershipService: translation only."""

from __future__ import annotations

import grpc
from agentpost.environments.v1 import environment_pb2, member_pb2, member_pb2_grpc
from google.protobuf import empty_pb2

from service.application.members import Members
from service.transport import context, convert, enums


class MembershipServicer(member_pb2_grpc.MembershipServiceServicer):
    """gRPC face of the membership use cases."""

    def __init__(self, members: Members) -> None:
        self._members = members

    async def CreateMember(
        self, request: member_pb2.CreateMemberRequest, _context: grpc.aio.ServicerContext
    ) -> member_pb2.Member:
        member = await self._members.create(
            context.principal(),
            request.email,
            request.display_name,
            enums.org_role("role", request.role),
            request.request_id,
        )
        return convert.member(member)

    async def GetMember(
        self, request: member_pb2.GetMemberRequest, _context: grpc.aio.ServicerContext
    ) -> member_pb2.Member:
        return convert.member(await self._members.get(context.principal(), request.id))

    async def ListMembers(
        self, request: member_pb2.ListMembersRequest, _context: grpc.aio.ServicerContext
    ) -> member_pb2.ListMembersResponse:
        page = await self._members.list(context.principal(), request.page_size, request.page_token)
        return member_pb2.ListMembersResponse(
            members=[convert.member(member) for member in page.items], next_page_token=page.next_page_token
        )

    async def UpdateMember(
        self, request: member_pb2.UpdateMemberRequest, _context: grpc.aio.ServicerContext
    ) -> member_pb2.Member:
        given = request.member
        member = await self._members.update(
            context.principal(),
            given.id,
            given.display_name,
            enums.org_role("member.role", given.role),
            convert.update_mask(request.update_mask, given),
            given.etag,
        )
        return convert.member(member)

    async def DeleteMember(
        self, request: member_pb2.DeleteMemberRequest, _context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._members.delete(context.principal(), request.id, request.etag)
        return empty_pb2.Empty()

    async def AddEnvironmentMember(
        self, request: member_pb2.AddEnvironmentMemberRequest, _context: grpc.aio.ServicerContext
    ) -> member_pb2.EnvironmentMember:
        membership = await self._members.add_environment_member(
            context.principal(),
            request.environment_id,
            request.member_id,
            enums.env_role("role", request.role),
        )
        return convert.environment_member(membership)

    async def ListEnvironmentMembers(
        self, request: member_pb2.ListEnvironmentMembersRequest, _context: grpc.aio.ServicerContext
    ) -> member_pb2.ListEnvironmentMembersResponse:
        page = await self._members.list_environment_members(
            context.principal(), request.environment_id, request.page_size, request.page_token
        )
        return member_pb2.ListEnvironmentMembersResponse(
            environment_members=[convert.environment_member(membership) for membership in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateEnvironmentMember(
        self, request: member_pb2.UpdateEnvironmentMemberRequest, _context: grpc.aio.ServicerContext
    ) -> member_pb2.EnvironmentMember:
        given = request.environment_member
        membership = await self._members.update_environment_member(
            context.principal(),
            given.environment_id,
            given.member_id,
            enums.env_role("environment_member.role", given.role),
            convert.update_mask(request.update_mask, given),
            given.etag,
        )
        return convert.environment_member(membership)

    async def RemoveEnvironmentMember(
        self, request: member_pb2.RemoveEnvironmentMemberRequest, _context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self._members.remove_environment_member(
            context.principal(), request.environment_id, request.member_id, request.etag
        )
        return empty_pb2.Empty()

    async def ListMemberEnvironments(
        self, request: member_pb2.ListMemberEnvironmentsRequest, _context: grpc.aio.ServicerContext
    ) -> member_pb2.ListMemberEnvironmentsResponse:
        page = self._members.list_member_environments(
            context.principal(), request.member_id, request.page_size, request.page_token
        )
        environments: list[environment_pb2.Environment] = [convert.environment(env) for env in page.items]
        return member_pb2.ListMemberEnvironmentsResponse(
            environments=environments, next_page_token=page.next_page_token
        )
