"""The command line: `serve`, `migrate` and `bootstrap`. Every setting is a flag and an
environment variable; `--help` lists them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from service.app import logs
from service.app.config import Settings
from service.app.server import Application, BindError
from service.application.organizations import CreatedOrganization
from service.domain.errors import DomainError

log = logging.getLogger("service")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentpost-environments",
        description="AgentPost Environments: tenant isolation, members and API keys over gRPC.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve gRPC until SIGTERM/SIGINT")
    serve.add_argument(
        "--migrate", action="store_true", help="migrate the database to the newest schema first"
    )
    serve.add_argument(
        "--bootstrap-if-empty",
        action="store_true",
        help="on an empty database, create one organization and print its owner key once",
    )
    commands.add_parser("migrate", help="migrate the database to the newest schema and exit")
    bootstrap = commands.add_parser(
        "bootstrap", help="create an organization locally and print its owner key"
    )
    bootstrap.add_argument("--name", default="Local organization", help="the organization's name")
    bootstrap.add_argument("--owner-email", default="owner@example.com", help="the OWNER member's email")
    for sub in (serve, commands.choices["migrate"], bootstrap):
        for name, field in Settings.model_fields.items():
            sub.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                default=None,
                help=f"{field.description} [env AGENTPOST_{name.upper()}; default {field.default!r}]",
            )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def _prepare_sqlite(settings: Settings) -> None:
    prefix = "sqlite+aiosqlite:///"
    if settings.database_url.startswith(prefix):
        path = settings.database_url[len(prefix) :]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _print_owner_key(created: CreatedOrganization, address: str) -> None:
    secret = created.owner_api_key_secret
    print(
        "\nBootstrapped organization "
        f"{created.organization.id} ({created.organization.name}).\n"
        "Owner API key (shown once, store it now):\n\n"
        f"  {secret}\n\n"
        "Try it:\n\n"
        f"  buf curl --protocol grpc --http2-prior-knowledge -H 'authorization: Bearer {secret}' \\\n"
        f"    http://{address}/agentpost.environments.v1.EnvironmentService/ListEnvironments\n",
        flush=True,
    )


async def _bootstrap(app: Application, name: str, owner_email: str) -> CreatedOrganization:
    return await app.organizations.create(name, owner_email, "Owner", "")


async def _serve(settings: Settings, migrate: bool, bootstrap_if_empty: bool) -> int:
    app = Application(settings)
    if migrate:
        await app.migrate()
    created = None
    if bootstrap_if_empty and not await app.organizations.any_exists():
        created = await _bootstrap(app, "Local organization", "owner@example.com")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stopping.is_set():
            log.warning("second signal: exiting at once")
            os._exit(1)
        log.info("signal received: draining")
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        port = await app.start()
    except BindError as error:
        log.error("%s", error)
        await app.database.dispose()
        return 2
    if created is not None:
        host = settings.listen_address.rsplit(":", 1)[0]
        _print_owner_key(created, f"{host}:{port}")
    await stopping.wait()
    await app.stop()
    return 0


async def _migrate(settings: Settings) -> int:
    app = Application(settings)
    await app.migrate()
    await app.database.dispose()
    print("database is at the newest schema")
    return 0


async def _bootstrap_command(settings: Settings, name: str, owner_email: str) -> int:
    app = Application(settings)
    await app.migrate()
    try:
        created = await _bootstrap(app, name, owner_email)
    finally:
        await app.database.dispose()
    _print_owner_key(created, settings.listen_address)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `agentpost-environments`."""
    args = _parser().parse_args(argv)
    settings = _settings(args)
    logs.configure(settings.log_level, settings.log_format)
    _prepare_sqlite(settings)
    try:
        if args.command == "serve":
            return asyncio.run(_serve(settings, args.migrate, args.bootstrap_if_empty))
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        return asyncio.run(_bootstrap_command(settings, args.name, args.owner_email))
    except DomainError as error:
        log.error("%s: %s", error.reason, error.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
