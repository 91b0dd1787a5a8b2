"""Builds the gRPC server: storage, the access cache, services, interceptor, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

import grpc
from agentpost.environments.v1 import (
    api_key_pb2,
    api_key_pb2_grpc,
    environment_pb2,
    environment_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
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
from service.app.config import Settings, TokenSetting, environment_variable
from service.app.credentials import ServerTls, TokenFile
from service.app.metrics import MetricsEndpoint
from service.application.access import AccessCache
from service.application.api_keys import ApiKeys
from service.application.dependencies import Dependencies
from service.application.environments import Environments
from service.application.event_hub import EventHub
from service.application.event_retention import EventRetention
from service.application.events import Events
from service.application.members import Members
from service.application.organizations import Organizations
from service.application.resources import Resources
from service.domain.errors import Unavailable
from service.domain.keys import SecretHasher
from service.domain.pagination import Pager, PageTokens
from service.storage import migrate
from service.storage.database import Database, build_engine
from service.transport.bearer_tokens import BearerTokens, VerifierTokens
from service.transport.call_log import CallLogInterceptor
from service.transport.interceptor import MAX_METADATA_BYTES, AuthInterceptor
from service.transport.servicers.api_keys import ApiKeyServicer
from service.transport.servicers.environments import EnvironmentServicer
from service.transport.servicers.events import EventServicer
from service.transport.servicers.members import MembershipServicer
from service.transport.servicers.organizations import OrganizationServicer
from service.transport.servicers.resources import ResourceServicer
from service.transport.throttle import AuthFailureThrottle

log = logging.getLogger(__name__)

# Without notifications (SQLite) other processes' writes are found by polling the revisions of
# the cached organizations: one indexed read this often. With LISTEN/NOTIFY (PostgreSQL) the poll
# is only the safety net for a lost notification.
SQLITE_REFRESH_SECONDS = 0.05
NOTIFIED_REFRESH_SECONDS = 1.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
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


def server_options(workers: int) -> list[tuple[str, int]]:
    """SERVER_OPTIONS; the workers of `serve --workers N` share their port (SO_REUSEPORT), having
    checked first that no other process holds it (service/app/workers.py)."""
    return [
        (name, 1 if name == "grpc.so_reuseport" and workers > 1 else value) for name, value in SERVER_OPTIONS
    ]


SERVICE_NAMES = (
    organization_pb2.DESCRIPTOR.services_by_name["OrganizationService"].full_name,
    environment_pb2.DESCRIPTOR.services_by_name["EnvironmentService"].full_name,
    member_pb2.DESCRIPTOR.services_by_name["MembershipService"].full_name,
    api_key_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
    resource_pb2.DESCRIPTOR.services_by_name["ResourceService"].full_name,
    event_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
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
    """Serving cannot begin: the listen address could not be bound, or a TLS file not read."""


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
            refresh_interval=settings.cache_refresh_seconds
            or (SQLITE_REFRESH_SECONDS if self.engine.dialect.name == "sqlite" else NOTIFIED_REFRESH_SECONDS),
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
        # WatchEvents streams hear every revision the access cache applies.
        self.event_hub = EventHub()
        self.access.on_applied(self.event_hub.publish)
        self.retention = EventRetention(
            self.database,
            retention=timedelta(days=settings.event_retention_days),
            interval_seconds=settings.event_prune_interval_seconds,
        )
        self.health = _ShutdownHealth()
        # Observability before authentication, so refused calls are seen too. Tracing outermost:
        # its span is current in everything after it. Then metrics, whose clock starts before
        # authentication, then the call's method for log lines (and the access log).
        self.tls = (
            ServerTls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
            if settings.tls_cert_file is not None and settings.tls_key_file is not None
            else None
        )
        self.metrics = (
            MetricsEndpoint(
                settings.metrics_address,
                self.access.stats,
                self.database.read_pool,
                lambda: self.event_hub.subscribers,
                self.database.commit_counts,
                self.tls,
            )
            if settings.metrics_address
            else None
        )
        self.traces = traces or tracing.from_environment()
        observing: list[grpc.aio.ServerInterceptor] = []
        if self.traces is not None:
            for engine in self.database.engines:
                self.traces.instrument(engine)
            observing.extend(self.traces.interceptors())
        if self.metrics is not None:
            observing.append(self.metrics.calls.interceptor())
        if settings.access_log:
            # Off, it is not in the chain at all: each interceptor costs every call (about 5%
            # of a bare call's throughput); authentication names the method for log lines.
            observing.append(CallLogInterceptor(access_log_on=True))
        self.throttle = AuthFailureThrottle(settings.auth_failures_per_minute)
        # Those of a @FILE are read when the server starts (`_follow_token_files`).
        self.verifier_tokens = VerifierTokens(settings.tokens("verifier_tokens").inline)
        self.operator_tokens = BearerTokens(settings.tokens("operator_token").inline)
        self.server = grpc.aio.server(
            interceptors=[
                *observing,
                AuthInterceptor(
                    self.access,
                    self.operator_tokens,
                    self.verifier_tokens,
                    self.throttle,
                ),
            ],
            options=server_options(settings.workers),
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
        event_pb2_grpc.add_EventServiceServicer_to_server(
            EventServicer(
                Events(
                    self.dependencies,
                    self.event_hub,
                    heartbeat_seconds=settings.watch_heartbeat_seconds,
                    buffer_revisions=settings.watch_buffer_revisions,
                )
            ),
            registrar,
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
        self._schema_ready = False

    async def migrate(self) -> None:
        """Brings the schema to the newest revision."""
        await migrate.upgrade(self.engine)

    async def schema_pending(self) -> str | None:
        """None when the database is at the newest schema, else what it is at, in words."""
        return await migrate.pending(self.engine)

    def _follow_token_files(self) -> None:
        """Reads the verifier-token and operator-token files, for the settings that name one, and
        has them read again as they change. A file that cannot be used now is a BindError naming
        the setting."""
        settings: tuple[tuple[TokenSetting, BearerTokens], ...] = (
            ("verifier_tokens", self.verifier_tokens),
            ("operator_token", self.operator_tokens),
        )
        for name, tokens in settings:
            source = self.settings.tokens(name)
            if source.file is None:
                continue
            try:
                token_file = TokenFile(source.file, name.replace("_", " "), commas=source.commas)
            except ValueError as error:  # checked with the settings, but it may have changed since
                raise BindError(f"{environment_variable(name)}: {error}") from error
            tokens.follow(token_file.tokens, token_file)

    def _credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the configured PEM files (mTLS with a client CA), taking up new
        files as they are written (see `credentials`); None: plaintext."""
        if self.tls is None:
            return None
        try:
            return self.tls.credentials()
        except ValueError as error:  # checked with the settings, but they may have changed since
            raise BindError(str(error)) from error

    async def start(self) -> int:
        """Binds and starts serving; every service is SERVING once the schema is current and the
        database has answered (see `_follow_database`). Returns the bound port."""
        credentials = self._credentials()
        self._follow_token_files()
        await self._check_schema()
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(self.settings.listen_address)
            else:
                self.port = self.server.add_secure_port(self.settings.listen_address, credentials)
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
        self.retention.start()
        self._health_task = asyncio.create_task(self._follow_database(serving))
        mode = "plaintext" if credentials is None else "mTLS" if self.settings.tls_client_ca_file else "TLS"
        log.info("serving on %s (port %d, %s)", self.settings.listen_address, self.port, mode)
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
            # Event streams end UNAVAILABLE with the revision they reached, to resume elsewhere.
            self.event_hub.close()
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

    async def _check_schema(self) -> bool:
        """Whether the database is at the newest schema. Until it is (or while it cannot be told),
        every unit of work is refused `UNAVAILABLE`: `DATABASE_NOT_MIGRATED` with how to fix it,
        or `DATABASE_UNAVAILABLE`. Once it is, the page-token key is loaded and calls go through."""
        if self._schema_ready:
            return True
        before = self.database.closed_because
        try:
            problem = await migrate.pending(self.engine)
        except Unavailable as error:
            self.database.closed_because = (
                "DATABASE_UNAVAILABLE",
                "the database has not answered since the server started; retry later",
            )
            if before is None or before[0] != "DATABASE_UNAVAILABLE":
                log.warning("cannot read the schema revision (%s); NOT_SERVING until it can", error.message)
            return False
        if problem is not None:
            self.database.closed_because = ("DATABASE_NOT_MIGRATED", problem)
            if before is None or before[0] != "DATABASE_NOT_MIGRATED":
                log.error("%s; NOT_SERVING until then", problem)
            return False
        await self.dependencies.use_stored_page_token_key()
        self.database.closed_because = None
        self._schema_ready = True
        if before is not None:
            log.info("the database schema is current now")
        return True

    async def _initial_health(self) -> bool:
        """NOT_SERVING until the schema is current and the database has answered once; returns
        whether both hold."""
        serving = self._schema_ready and await self.access.confirm()
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
                # Someone may migrate the database while this server waits for it.
                now_serving = await self._check_schema() and self.access.fresh_enough()
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
            await self.retention.stop()
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
