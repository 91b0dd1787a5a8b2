"""Builds the gRPC server: storage, the access cache, services, interceptor, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from agentpost.environments.v1 import (
    api_key_pb2,
    api_key_pb2_grpc,
    environment_pb2,
    environment_pb2_grpc,
    member_pb2,
    member_pb2_grpc,
    organization_pb2,
    organization_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.app import logs, tracing
from service.app.config import Settings
from service.app.metrics import MetricsEndpoint
from service.application.access import AccessCache
from service.application.api_keys import ApiKeys
from service.application.dependencies import Dependencies
from service.application.environments import Environments
from service.application.members import Members
from service.application.organizations import Organizations
from service.application.resources import Resources
from service.domain.keys import SecretHasher
from service.domain.pagination import Pager, PageTokens
from service.storage import migrate
from service.storage.database import Database, build_engine
from service.storage.server_secrets import page_token_key
from service.transport.call_log import CallLogInterceptor
from service.transport.interceptor import AuthInterceptor
from service.transport.servicers.api_keys import ApiKeyServicer
from service.transport.servicers.environments import EnvironmentServicer
from service.transport.servicers.members import MembershipServicer
from service.transport.servicers.organizations import OrganizationServicer
from service.transport.servicers.resources import ResourceServicer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024
SERVER_OPTIONS = [
    # Requests are small; 4 MiB bounds memory per call while leaving room for large pages.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # One limit for a request's metadata. gRPC's defaults (a soft 8 KiB under a hard 16 KiB) refuse
    # metadata between the two at random, so the same request could get two different answers.
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    # Ping idle connections so dead peers behind load balancers are noticed within ~1.5 minutes,
    # and accept client pings no more often than every 10 s.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A port that is taken must fail the start, not be shared with another process.
    ("grpc.so_reuseport", 0),
]

SERVICE_NAMES = (
    organization_pb2.DESCRIPTOR.services_by_name["OrganizationService"].full_name,
    environment_pb2.DESCRIPTOR.services_by_name["EnvironmentService"].full_name,
    member_pb2.DESCRIPTOR.services_by_name["MembershipService"].full_name,
    api_key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
    resource_pb2.DESCRIPTOR.services_by_name["ResourceService"].full_name,
)


class _GenericHandlersOnly:
    """Takes the generated `add_*_to_server` registrations and keeps only the generic handlers.

    grpc.aio 1.85 waits on one future per pre-registered method for every incoming call; with the
    ~36 methods served here that cost about 8% of the hot paths' throughput. A generic handler is a
    dictionary lookup per call instead.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Registers the service's generic handler on the real server."""
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, _service_name: str, _handlers: Any) -> None:
        """Deliberately ignored: see the class docstring."""


class _WatchedContext:
    """A Watch call's context that remembers the last status written, and lets the stream be
    ended only between writes."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self.writing = asyncio.Lock()
        self.last_status: int | None = None

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        """Writes one status message to the stream."""
        async with self.writing:
            await self._context.write(response)
            self.last_status = response.status


class _ShutdownHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """The standard health service, whose Watch streams end once the server stops accepting calls.

    A load balancer holds a Watch stream open for as long as the server lives; left alone, each one
    would keep `server.stop(grace)` waiting for the whole grace period.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watches_closed = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        """Streams the service's status, as the standard service does, until `close_watches()`;
        a stream that showed SERVING ends on NOT_SERVING."""
        watched = _WatchedContext(context)
        watching = asyncio.ensure_future(super().Watch(request, watched))
        closed = asyncio.ensure_future(self._watches_closed.wait())
        try:
            await asyncio.wait((watching, closed), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            watching.cancel()
            raise
        finally:
            closed.cancel()
        if watching.done():
            watching.result()
            return
        # Cancelled between writes only: a write cut short would leave the stream unusable.
        async with watched.writing:
            watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        # Closing may overtake the standard Watch before it writes the NOT_SERVING that
        # `enter_graceful_shutdown` announced; the watcher must still see it.
        if watched.last_status == health_pb2.HealthCheckResponse.SERVING:
            await context.write(
                health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
            )

    def close_watches(self) -> None:
        """Ends every Watch stream, open or still to come, with status OK."""
        self._watches_closed.set()


class BindError(RuntimeError):
    """The listen address could not be bound."""


class Application:
    """One server process: build it, `start()`, then `stop()`."""

    def __init__(self, settings: Settings, traces: tracing.Tracing | None = None) -> None:
        """`traces` defaults to what the OTel environment variables configure (usually nothing)."""
        self.settings = settings
        logs.install_request_ids()
        self.engine = build_engine(
            settings.database_url, schema=settings.database_schema, timeout=settings.database_timeout_seconds
        )
        self.database = Database(self.engine)
        self.hasher = SecretHasher(settings.key_pepper)
        self.access = AccessCache(
            self.database,
            self.hasher,
            max_keys=settings.key_cache_size,
            refresh_interval=settings.cache_refresh_seconds,
            max_staleness=settings.max_staleness_seconds,
            # A poll may wait for a pooled connection, then for a connect, then run.
            poll_timeout=3 * settings.database_timeout_seconds,
        )
        self._health_task: asyncio.Task[None] | None = None
        self.dependencies = Dependencies(
            database=self.database,
            access=self.access,
            hasher=self.hasher,
            pager=Pager(PageTokens(settings.key_pepper)),
        )
        self.organizations = Organizations(self.dependencies)
        self.health = _ShutdownHealth()
        # Observability before authentication, so refused calls are seen too. Tracing outermost:
        # its span is current in everything after it. Then metrics, whose clock starts before
        # authentication, then the call's method for log lines (and the access log).
        self.metrics = (
            MetricsEndpoint(settings.metrics_address, self.access.stats, self.engine.sync_engine.pool)
            if settings.metrics_address
            else None
        )
        self.traces = traces or tracing.from_environment()
        observing: list[grpc.aio.ServerInterceptor] = []
        if self.traces is not None:
            self.traces.instrument(self.engine)
            observing.extend(self.traces.interceptors())
        if self.metrics is not None:
            observing.append(self.metrics.calls.interceptor())
        observing.append(CallLogInterceptor(settings.access_log))
        self.server = grpc.aio.server(
            interceptors=[*observing, AuthInterceptor(self.access, settings.operator_token)],
            options=SERVER_OPTIONS,
        )
        registrar = _GenericHandlersOnly(self.server)
        organization_pb2_grpc.add_OrganizationServiceServicer_to_server(
            OrganizationServicer(self.organizations), registrar
        )
        environment_pb2_grpc.add_EnvironmentServiceServicer_to_server(
            EnvironmentServicer(Environments(self.dependencies)), registrar
        )
        member_pb2_grpc.add_MembershipServiceServicer_to_server(
            MembershipServicer(Members(self.dependencies)), registrar
        )
        api_key_pb2_grpc.add_ApiKeyServiceServicer_to_server(
            ApiKeyServicer(
                ApiKeys(self.dependencies),
                on_verification=self.metrics.calls.verification if self.metrics is not None else None,
            ),
            registrar,
        )
        resource_pb2_grpc.add_ResourceServiceServicer_to_server(
            ResourceServicer(Resources(self.dependencies)), registrar
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            registrar,
        )
        self.port = 0

    async def migrate(self) -> None:
        """Brings the schema to the newest revision."""
        await migrate.upgrade(self.engine)

    async def start(self) -> int:
        """Binds, starts serving and marks every service SERVING; returns the bound port."""
        if not self.dependencies.pager.tokens.has_key:
            # No pepper: every server on this database signs with the key stored in it.
            self.dependencies.pager.tokens.use_key(await page_token_key(self.database))
        try:
            self.port = self.server.add_insecure_port(self.settings.listen_address)
        except RuntimeError as error:
            raise BindError(f"cannot listen on {self.settings.listen_address}: {error}") from error
        if self.port == 0:
            raise BindError(f"cannot listen on {self.settings.listen_address}")
        if self.metrics is not None:
            try:
                self.metrics.start()
            except (OSError, ValueError) as error:
                raise BindError(f"cannot serve metrics on {self.metrics.address}: {error}") from error
        serving = await self._initial_health()
        await self.server.start()
        self.access.start()
        self._health_task = asyncio.create_task(self._follow_database(serving))
        log.info("serving on %s (port %d)", self.settings.listen_address, self.port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Shuts down in order: health NOT_SERVING; calls still served for the drain delay, so that
        load balancers move traffic away first; then new calls are refused (UNAVAILABLE), Watch
        streams end and in-flight calls finish within the grace; storage closes last, whatever
        failed before."""
        try:
            await self.health.enter_graceful_shutdown()
            if self.settings.shutdown_drain_seconds > 0:
                log.info("NOT_SERVING; still serving calls for %.1f s", self.settings.shutdown_drain_seconds)
                await asyncio.sleep(self.settings.shutdown_drain_seconds)
            stopping = asyncio.ensure_future(
                self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
            )
            # One turn of the loop lets the server stop accepting first: a watcher whose stream
            # ends then finds the server gone rather than opening a new stream that waits out the
            # grace.
            await asyncio.sleep(0)
            self.health.close_watches()
            await stopping
        finally:
            await self._close_storage()
        log.info("stopped")

    # -- health and storage lifetime --------------------------------------------------------------

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _initial_health(self) -> bool:
        """NOT_SERVING until the database has answered once; returns whether it has."""
        serving = await self.access.confirm()
        await self._set_health(serving)
        return serving

    async def _follow_database(self, serving: bool) -> None:
        """Keeps health honest: SERVING while the database last answered within the maximum
        staleness (so a short outage does not pull every replica from a load balancer at once),
        NOT_SERVING after, SERVING again as soon as a poll succeeds. Health ignores updates once
        shutdown began."""
        interval = min(1.0, self.access.refresh_interval)
        while True:
            await asyncio.sleep(interval)
            try:
                now_serving = self.access.fresh_enough()
                if now_serving != serving:
                    await self._set_health(now_serving)
                    serving = now_serving
                    if serving:
                        log.info("health SERVING: the database answers again")
                    else:
                        log.warning(
                            "health NOT_SERVING: the database has not answered for %.0f s",
                            self.access.staleness(),
                        )
            except Exception:
                log.exception("health update failed; retrying")

    async def _close_storage(self) -> None:
        """Stops background work, the metrics endpoint and trace export, and disposes the engine,
        whatever fails on the way."""
        try:
            if self._health_task is not None:
                self._health_task.cancel()
                await asyncio.gather(self._health_task, return_exceptions=True)
                self._health_task = None
            await self.access.stop()
        except Exception:
            log.exception("stopping background work failed")
        finally:
            try:
                # Both block (an HTTP server's poll, a last export): off the event loop.
                if self.metrics is not None:
                    await asyncio.to_thread(self.metrics.stop)
                if self.traces is not None:
                    await asyncio.to_thread(self.traces.shutdown)
            finally:
                await self.database.dispose()
