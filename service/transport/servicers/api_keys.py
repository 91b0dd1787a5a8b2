"""ApiKeyService: translation only."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import grpc
from agentpost.environments.v1 import api_key_pb2, api_key_pb2_grpc

from service.application.api_keys import ApiKeys, KeyChanges, Verification
from service.domain.clock import utcnow
from service.domain.models import ApiKey
from service.transport import context, convert, enums
from service.transport.memo import IdentityMemo


class ApiKeyServicer(api_key_pb2_grpc.ApiKeyServiceServicer):
    """gRPC face of the API key use cases."""

    def __init__(self, api_keys: ApiKeys, on_verification: Callable[[str], None] | None = None) -> None:
        self._keys = api_keys
        # Told each VerifyApiKey outcome ("VALID" or the denial reason), for metrics.
        self._on_verification = on_verification
        # Granted answers per principal and environment (see memo).
        self._granted: IdentityMemo[api_key_pb2.VerifyApiKeyResponse] = IdentityMemo()

    def _wire(self, key: ApiKey, now: datetime | None = None) -> api_key_pb2.ApiKey:
        return convert.api_key(key, now=now or utcnow(), last_used_time=self._keys.last_used(key))

    async def CreateApiKey(
        self, request: api_key_pb2.CreateApiKeyRequest, _context: grpc.aio.ServicerContext
    ) -> api_key_pb2.CreateApiKeyResponse:
        created = await self._keys.create(
            context.principal(),
            name=request.name,
            scope_names=list(request.scopes),
            environment_ids=list(request.environment_ids),
            owner_member_id=request.owner_member_id,
            mode=enums.key_mode("mode", request.mode),
            expire_time=convert.to_datetime("expire_time", request.expire_time)
            if request.HasField("expire_time")
            else None,
            request_id=request.request_id,
        )
        return api_key_pb2.CreateApiKeyResponse(api_key=self._wire(created.key), secret=created.secret)

    async def GetApiKey(
        self, request: api_key_pb2.GetApiKeyRequest, _context: grpc.aio.ServicerContext
    ) -> api_key_pb2.ApiKey:
        return self._wire(await self._keys.get(context.principal(), request.id))

    async def ListApiKeys(
        self, request: api_key_pb2.ListApiKeysRequest, _context: grpc.aio.ServicerContext
    ) -> api_key_pb2.ListApiKeysResponse:
        page = await self._keys.list(
            context.principal(),
            request.page_size,
            request.page_token,
            request.environment_id,
            request.show_revoked,
        )
        now = utcnow()
        return api_key_pb2.ListApiKeysResponse(
            api_keys=[self._wire(key, now) for key in page.items], next_page_token=page.next_page_token
        )

    async def UpdateApiKey(
        self, request: api_key_pb2.UpdateApiKeyRequest, _context: grpc.aio.ServicerContext
    ) -> api_key_pb2.ApiKey:
        given = request.api_key
        changes = KeyChanges(
            name=given.name,
            scopes=list(given.scopes),
            environment_ids=list(given.environment_ids),
            expire_time=convert.to_datetime("api_key.expire_time", given.expire_time)
            if given.HasField("expire_time")
            else None,
        )
        key = await self._keys.update(
            context.principal(),
            given.id,
            changes,
            convert.update_mask(request.update_mask, given),
            given.etag,
        )
        return self._wire(key)

    async def RevokeApiKey(
        self, request: api_key_pb2.RevokeApiKeyRequest, _context: grpc.aio.ServicerContext
    ) -> api_key_pb2.ApiKey:
        return self._wire(await self._keys.revoke(context.principal(), request.id, request.etag))

    async def RollApiKey(
        self, request: api_key_pb2.RollApiKeyRequest, _context: grpc.aio.ServicerContext
    ) -> api_key_pb2.RollApiKeyResponse:
        ttl = (
            convert.to_timedelta("previous_key_ttl", request.previous_key_ttl)
            if request.HasField("previous_key_ttl")
            else None
        )
        rolled = await self._keys.roll(context.principal(), request.id, ttl, request.etag)
        now = utcnow()
        return api_key_pb2.RollApiKeyResponse(
            api_key=self._wire(rolled.key, now),
            secret=rolled.secret,
            previous_api_key=self._wire(rolled.previous, now),
        )

    async def VerifyApiKey(
        self, request: api_key_pb2.VerifyApiKeyRequest, _context: grpc.aio.ServicerContext
    ) -> api_key_pb2.VerifyApiKeyResponse:
        verification = await self._keys.verify(
            request.secret,
            request.environment,
            list(request.required_scopes),
            request.min_revision,
            header_min_revision=context.current_min_revision.get(),
        )
        if self._on_verification is not None:
            self._on_verification(verification.denial.value if verification.denial is not None else "VALID")
        principal, environment = verification.principal, verification.environment
        if principal is None or environment is None:
            return _verification(verification)
        return self._granted.get(principal, environment.id, lambda: _verification(verification))


def _verification(outcome: Verification) -> api_key_pb2.VerifyApiKeyResponse:
    response = api_key_pb2.VerifyApiKeyResponse(
        valid=outcome.valid,
        denial_reason=outcome.denial.value if outcome.denial is not None else "DENIAL_REASON_UNSPECIFIED",
    )
    if outcome.key_id:
        who = response.principal
        who.organization_id = outcome.organization_id
        who.api_key_id = outcome.key_id
    if outcome.principal is not None:
        key = outcome.principal.key
        who = response.principal
        who.owner_member_id = key.owner_member_id or ""
        who.organization_wide = key.organization_wide
        who.scopes.extend(key.scopes)
        who.allowed_environment_ids.extend(outcome.principal.allowed_in_order())
    if outcome.environment is not None:
        response.principal.environment_id = outcome.environment.id
        response.principal.environment_slug = outcome.environment.slug
    return response
