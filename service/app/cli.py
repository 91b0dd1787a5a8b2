"""The command line: `serve`, `migrate` and `bootstrap`. Every setting is an environment variable,
and each subcommand takes as flags the settings it uses; `--help` lists them.

Exit codes: 0 done; 1 the database refused or did not answer (one line says why); 2 a setting is
wrong or the address is taken (one line names it), and nothing was created.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.app import logs, seeding, workers
from service.app.config import DEFAULT_DATABASE_URL, Settings, environment_variable
from service.app.server import Application, BindError
from service.application.organizations import CreatedOrganization, Organizations
from service.domain import validation
from service.domain.errors import DomainError, InvalidArgument
from service.storage.migrate import SchemaUnknown

log = logging.getLogger("service")

DEFAULT_ORGANIZATION_NAME = "Local organization"
DEFAULT_OWNER_EMAIL = "owner@example.com"

# The settings each subcommand uses, and so offers as flags (`serve` uses every one).
_DATABASE_SETTINGS = ("database_url", "database_schema", "database_timeout_seconds", "log_level")
_COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "migrate": _DATABASE_SETTINGS,
    # The listen address and TLS files only shape the example command that bootstrap prints.
    "bootstrap": (*_DATABASE_SETTINGS, "key_pepper", "listen_address"),
}


def _add_settings(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    for name in names:
        field = Settings.model_fields[name]
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"{field.description} [env {environment_variable(name)}; default {field.default!r}]",
        )


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
    _add_settings(serve, Settings.model_fields)
    # Set by the supervisor of `--workers N` on the processes it starts.
    serve.add_argument(workers.WORKER_FLAG, dest="worker_of", default=None, help=argparse.SUPPRESS)
    migrate = commands.add_parser("migrate", help="migrate the database to the newest schema and exit")
    _add_settings(migrate, _COMMAND_SETTINGS["migrate"])
    bootstrap = commands.add_parser(
        "bootstrap", help="create an organization in the database directly and print its owner key"
    )
    bootstrap.add_argument("--name", help=f"the organization's name (default {DEFAULT_ORGANIZATION_NAME!r})")
    bootstrap.add_argument(
        "--owner-email", help=f"the email of its OWNER member (default {DEFAULT_OWNER_EMAIL!r})"
    )
    _add_settings(bootstrap, _COMMAND_SETTINGS["bootstrap"])
    seed = commands.add_parser(
        "seed",
        help="fill the database with organizations, environments and keys to measure at scale",
        description=seeding.__doc__.split("\n\n")[1] if seeding.__doc__ else None,
    )
    seed.add_argument(
        "--organizations", type=_positive, default=1, help="organizations to create (default 1)"
    )
    seed.add_argument(
        "--environments",
        type=_not_negative,
        default=0,
        help="environments per organization besides its default",
    )
    seed.add_argument(
        "--keys", type=_not_negative, default=0, help="keys per organization besides its owner key"
    )
    seed.add_argument(
        "--sample",
        type=_not_negative,
        default=1000,
        help="secrets of the first organization's keys to write out",
    )
    seed.add_argument(
        "--output",
        type=Path,
        required=True,
        help="JSON file for organization ids, owner secrets and the sample",
    )
    _add_settings(seed, _COMMAND_SETTINGS["bootstrap"])
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def _setting_errors(error: ValidationError) -> list[str]:
    """One line per wrong setting, naming its variable and flag; values are not echoed (some are
    secrets)."""
    lines = []
    for problem in error.errors():
        message = str(problem["msg"]).removeprefix("Value error, ")
        if problem["loc"]:
            name = str(problem["loc"][0])
            lines.append(
                f"invalid setting {environment_variable(name)} (--{name.replace('_', '-')}): {message}"
            )
        else:
            lines.append(f"invalid settings: {message}")
    return lines


def _prepare_sqlite(settings: Settings) -> None:
    """Makes the folder of the default SQLite file (the project's var/); any other must exist."""
    if settings.database_url == DEFAULT_DATABASE_URL:
        path = DEFAULT_DATABASE_URL.removeprefix("sqlite+aiosqlite:///")
        os.makedirs(os.path.dirname(path), exist_ok=True)


def _as_typed(path: Path) -> str:
    """A path as a user would type it from the current folder."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _tool(name: str) -> str:
    """How to run a command installed beside this interpreter (the project's .venv/bin)."""
    beside = Path(sys.executable).parent / name
    return shlex.quote(_as_typed(beside)) if beside.exists() else name


def _try_it(settings: Settings, address: str, secret: str) -> str:
    """A `buf curl` command that lists the organization's environments with the new key."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]"):  # noqa: S104 - listening everywhere; the example calls loopback
        host = "127.0.0.1"
    options = "--protocol grpc --http2-prior-knowledge"
    scheme = "http"
    if settings.tls_cert_file is not None:
        scheme = "https"
        options = "--protocol grpc --cacert CA.pem"
        if settings.tls_client_ca_file is not None:
            options += " --cert CLIENT.pem --key CLIENT-KEY.pem"
    command = (
        f"  {_tool('buf')} curl {options} -H 'authorization: Bearer {secret}' \\\n"
        f"    {scheme}://{host}:{port}/agentpost.environments.v1.EnvironmentService/ListEnvironments\n"
    )
    if scheme == "https":
        command += (
            "\n  (CA.pem: the CA that signed the server certificate"
            + (
                "; CLIENT.pem/CLIENT-KEY.pem: a client certificate from the client CA"
                if "--cert" in options
                else ""
            )
            + ")\n"
        )
    return command


def _print_owner_key(
    created: CreatedOrganization, settings: Settings, address: str, defaults_used: bool = False
) -> None:
    organization, environment = created.organization, created.default_environment
    lines = [
        "",
        f"Created organization {organization.id} ({organization.name!r}), its default environment "
        f"{environment.id} (slug {environment.slug!r}) and its OWNER member {created.owner.email}.",
    ]
    if defaults_used:
        lines.append(
            f"To choose the name and email: {_tool('agentpost-environments')} bootstrap "
            "--name 'Acme' --owner-email you@acme.example"
        )
    lines += [
        "",
        "Owner API key, with every scope (shown once, store it now):",
        "",
        f"  {created.owner_api_key_secret}",
        "",
        "Try it:",
        "",
        _try_it(settings, address, created.owner_api_key_secret),
    ]
    print("\n".join(lines), flush=True)


def _print_how_to_get_a_key() -> None:
    print(
        "\nThis database already has an organization; its owner key was printed once, when it was "
        "created.\nLost it? Make another organization with a new owner key:\n\n"
        f"  {_tool('agentpost-environments')} bootstrap --name 'My organization' "
        "--owner-email you@example.com\n\n"
        "or create a key with ApiKeyService/CreateApiKey using a key you still have.\n",
        flush=True,
    )


async def _bootstrap(app: Application, name: str, owner_email: str) -> CreatedOrganization:
    return await app.organizations.create(name, owner_email, "Owner", "")


async def _first_organization(organizations: Organizations) -> CreatedOrganization:
    return await organizations.create("Local organization", "owner@example.com", "Owner", "")


def _run_server(settings: Settings, serving: Coroutine[Any, Any, int]) -> int:
    """Runs a server process's main coroutine on the configured event loop."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is installed wherever it is built
            log.warning("uvloop is not installed here; serving on asyncio's event loop")
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serving)


async def _serve(
    settings: Settings, migrate: bool, bootstrap_if_empty: bool, role: workers.WorkerRole | None = None
) -> int:
    app = Application(settings)
    try:
        if migrate:
            await app.migrate()
        created = None
        existing = False
        # On a database that is not migrated the server starts NOT_SERVING and says why.
        if bootstrap_if_empty and await app.schema_pending() is None:
            existing = await app.organizations.any_exists()
            if not existing:
                created = await _bootstrap(app, DEFAULT_ORGANIZATION_NAME, DEFAULT_OWNER_EMAIL)
    except BaseException:
        await app.database.dispose()
        raise
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
    if role is not None:
        role.report_serving()
    host = settings.listen_address.rsplit(":", 1)[0]
    if created is not None:
        _print_owner_key(created, settings, f"{host}:{port}")
    elif existing:
        _print_how_to_get_a_key()
    await stopping.wait()
    await app.stop()
    return 0


async def _migrate(settings: Settings) -> int:
    app = Application(settings)
    try:
        await app.migrate()
    finally:
        await app.database.dispose()
    print("database is at the newest schema")
    return 0


async def _bootstrap_command(settings: Settings, name: str | None, owner_email: str | None) -> int:
    # Checked as CreateOrganization checks them, before anything is created or migrated; given
    # empty, a value is refused rather than defaulted (left out, it is defaulted).
    try:
        validation.name("--name", DEFAULT_ORGANIZATION_NAME if name is None else name)
        validation.email("--owner-email", DEFAULT_OWNER_EMAIL if owner_email is None else owner_email)
    except InvalidArgument as error:
        log.error("bootstrap: %s", error.message)
        return 2
    app = Application(settings)
    try:
        await app.migrate()
        created = await _bootstrap(
            app,
            DEFAULT_ORGANIZATION_NAME if name is None else name,
            DEFAULT_OWNER_EMAIL if owner_email is None else owner_email,
        )
    finally:
        await app.database.dispose()
    _print_owner_key(
        created, settings, settings.listen_address, defaults_used=name is None or owner_email is None
    )
    return 0


async def _seed_command(settings: Settings, args: argparse.Namespace) -> int:
    app = Application(settings)
    plan = seeding.SeedPlan(args.organizations, args.environments, args.keys, args.sample)
    try:
        await app.migrate()
        report = await seeding.seed(app, plan, lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        await app.database.dispose()
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    args.output.chmod(0o600)  # it holds owner secrets
    print(
        f"seeded {plan.organizations:,} organizations, {plan.organizations * (plan.environments + 1):,} "
        f"environments and {plan.organizations * (plan.keys + 1):,} keys in {report['seconds']} s; "
        f"secrets written to {args.output}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `agentpost-environments`."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as error:
        for line in _setting_errors(error):
            print(f"agentpost-environments: {line}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    _prepare_sqlite(settings)
    try:
        if args.command == "serve":
            role = workers.WorkerRole.parse(args.worker_of) if args.worker_of else None
            if role is None and settings.workers > 1:
                return workers.supervise(
                    settings,
                    migrate_first=args.migrate,
                    bootstrap=_first_organization if args.bootstrap_if_empty else None,
                    announce=lambda created, address: _print_owner_key(created, settings, address),
                )
            if role is not None:
                workers.become_worker(role)
            return _run_server(settings, _serve(settings, args.migrate, args.bootstrap_if_empty, role))
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "seed":
            return asyncio.run(_seed_command(settings, args))
        return asyncio.run(_bootstrap_command(settings, args.name, args.owner_email))
    except DomainError as error:
        log.error("%s failed: %s (%s)", args.command, error.message, error.reason)
        return 1
    except SchemaUnknown as error:
        log.error("%s failed: %s", args.command, error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
