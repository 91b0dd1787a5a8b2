"""The command line as a new operator meets it: bad settings, a database that is down, `--help`,
`bootstrap`, and the "try it" command that `make serve` prints."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.empty_database import empty_database
from tests.servers import PROJECT_ROOT, Backend, service_process

SECRET = re.compile(r"ap_sk_live_[0-9A-Za-z]{38}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_environment(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPOST_")}
    env.update({f"AGENTPOST_{name.upper()}": value for name, value in settings.items()})
    return env


async def _run(*arguments: str, env: dict[str, str], cwd: Path = PROJECT_ROOT) -> tuple[int, str, str]:
    process = await service_process(
        *arguments,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    return process.returncode or 0, stdout.decode(), stderr.decode()


_DATABASE = "sqlite+aiosqlite:///{folder}/agentpost.db"
# Each case: settings ("{folder}" is the test's empty working folder) and the variable named.
BAD_SETTINGS = {
    "grace-not-a-number": ({"shutdown_grace_seconds": "abc"}, "AGENTPOST_SHUTDOWN_GRACE_SECONDS"),
    "unsupported-database": (
        {"database_url": "mysql+aiomysql://user@localhost/db"},
        "AGENTPOST_DATABASE_URL",
    ),
    "not-a-url": ({"database_url": "not a url"}, "AGENTPOST_DATABASE_URL"),
    "sqlite-folder-missing": (
        {"database_url": "sqlite+aiosqlite:///{folder}/missing/agentpost.db"},
        "AGENTPOST_DATABASE_URL",
    ),
    "log-level": ({"log_level": "LOUD"}, "AGENTPOST_LOG_LEVEL"),
    "negative-limit": ({"auth_failures_per_minute": "-1"}, "AGENTPOST_AUTH_FAILURES_PER_MINUTE"),
    "tls-file-missing": ({"tls_cert_file": "{folder}/missing.pem"}, "AGENTPOST_TLS_CERT_FILE"),
    "tls-file-not-pem": ({"tls_key_file": str(PROJECT_ROOT / "README.md")}, "AGENTPOST_TLS_KEY_FILE"),
    "client-ca-missing": ({"tls_client_ca_file": "{folder}/ca.pem"}, "AGENTPOST_TLS_CLIENT_CA_FILE"),
    "token-file-missing": ({"verifier_tokens": "@{folder}/tokens"}, "AGENTPOST_VERIFIER_TOKENS"),
    "no-token": ({"verifier_tokens": " , "}, "AGENTPOST_VERIFIER_TOKENS"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
async def test_a_bad_setting_is_one_line_naming_it_exit_2_and_creates_nothing(
    tmp_path: Path, case: str
) -> None:
    template, variable = BAD_SETTINGS[case]
    settings = {"database_url": _DATABASE} | template
    env = _clean_environment(**{name: value.format(folder=tmp_path) for name, value in settings.items()})
    code, stdout, stderr = await _run("serve", "--migrate", "--bootstrap-if-empty", env=env, cwd=tmp_path)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert os.listdir(tmp_path) == []


async def test_a_setting_given_as_a_flag_is_named_as_the_flag_too(tmp_path: Path) -> None:
    code, _, stderr = await _run(
        "migrate", "--database-url", "mysql://x@y/z", env=_clean_environment(), cwd=tmp_path
    )
    assert code == 2 and "--database-url" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "arguments", [("migrate",), ("serve", "--migrate"), ("bootstrap",)], ids=["migrate", "serve", "bootstrap"]
)
async def test_a_database_that_is_down_is_one_line_without_a_traceback(arguments: tuple[str, ...]) -> None:
    # Nothing listens on this port: the connect is refused.
    env = _clean_environment(
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{_free_port()}/agentpost",
        database_timeout_seconds="2",
        listen_address=f"127.0.0.1:{_free_port()}",
    )
    code, _, stderr = await _run(*arguments, env=env)
    assert code in (1, 2), stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "DATABASE_UNAVAILABLE" in lines[0] and "Traceback" not in stderr, stderr


async def _help(command: str) -> str:
    code, stdout, _ = await _run(command, "--help", env=_clean_environment())
    assert code == 0
    return stdout


async def test_each_subcommand_s_help_lists_only_its_own_flags() -> None:
    serve, migrate, bootstrap = [await _help(command) for command in ("serve", "migrate", "bootstrap")]
    for flag in (
        "--listen-address",
        "--tls-cert-file",
        "--tls-key-file",
        "--tls-client-ca-file",
        "--verifier-tokens",
        "--auth-failures-per-minute",
        "--operator-token",
        "--key-pepper",
        "--database-url",
        "--migrate",
        "--bootstrap-if-empty",
    ):
        assert flag in serve
    assert "AGENTPOST_TLS_CLIENT_CA_FILE" in serve and "AGENTPOST_VERIFIER_TOKENS" in serve
    assert "--database-url" in migrate and "--database-schema" in migrate
    for flag in ("--listen-address", "--tls-cert-file", "--operator-token", "--key-pepper", "--name"):
        assert flag not in migrate
    for flag in ("--name", "--owner-email", "--database-url", "--key-pepper"):
        assert flag in bootstrap
    for flag in ("--tls-", "--operator-token", "--verifier-tokens", "--shutdown-", "--migrate "):
        assert flag not in bootstrap


@pytest.fixture
async def empty(backend: Backend, tmp_path: Path) -> AsyncIterator[Backend]:
    """A database of the test's own with no schema."""
    async with empty_database(backend, tmp_path) as database:
        yield database


def _database_environment(database: Backend, **settings: str) -> dict[str, str]:
    values = {"database_url": database.url, **settings}
    if database.schema is not None:
        values["database_schema"] = database.schema
    return _clean_environment(**values)


async def test_bootstrap_without_flags_says_what_it_made_and_how_to_choose(empty: Backend) -> None:
    code, stdout, stderr = await _run("bootstrap", env=_database_environment(empty))
    assert code == 0, stderr
    assert re.search(r"Created organization org_\w+ \('Local organization'\)", stdout)
    assert re.search(r"default environment env_\w+ \(slug 'default'\)", stdout)
    assert "OWNER member owner@example.com" in stdout
    assert "bootstrap --name" in stdout and "--owner-email" in stdout
    assert len(SECRET.findall(stdout)) == 2  # the key, and the key inside the example command

    code, stdout, _ = await _run(
        "bootstrap", "--name", "Acme", "--owner-email", "ops@acme.example", env=_database_environment(empty)
    )
    assert code == 0
    assert "('Acme')" in stdout and "OWNER member ops@acme.example" in stdout
    assert "bootstrap --name" not in stdout


async def _read_until(stream: asyncio.StreamReader, marker: str) -> str:
    seen = ""
    async with asyncio.timeout(60):
        while marker not in seen:
            line = (await stream.readline()).decode()
            assert line, f"the output ended before {marker!r}:\n{seen}"
            seen += line
    return seen


def _command_after(text: str, heading: str) -> str:
    """The indented command (continued with backslashes) that follows `heading`."""
    lines = text.split(heading, 1)[1].strip("\n").splitlines()
    command: list[str] = []
    for line in lines:
        if not line.strip():
            if command:
                break
            continue
        command.append(line.strip())
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(part.rstrip("\\").strip() for part in command)


async def _shell(command: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command, cwd=PROJECT_ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, _ = await process.communicate()
    return process.returncode or 0, stdout.decode()


async def _serve(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await service_process(
        "serve",
        "--migrate",
        "--bootstrap-if-empty",
        cwd=PROJECT_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.wait()


async def test_the_printed_commands_work_when_pasted(empty: Backend) -> None:
    env = _database_environment(empty, listen_address=f"127.0.0.1:{_free_port()}", shutdown_drain_seconds="0")
    first = await _serve(env)
    try:
        assert first.stdout is not None
        printed = await _read_until(first.stdout, "ListEnvironments")
        try_it = _command_after(printed, "Try it:")
        assert try_it.startswith(".venv/bin/buf curl "), try_it
        code, output = await _shell(try_it, env)
        assert code == 0, output
        assert [env["slug"] for env in json.loads(output)["environments"]] == ["default"]
    finally:
        await _stop(first)

    # Started again on the same database: no key, but how to get one.
    again = await _serve(env)
    try:
        assert again.stdout is not None
        printed = await _read_until(again.stdout, "--owner-email")
        assert "Lost it?" in printed and SECRET.search(printed) is None
        bootstrap = _command_after(printed, "new owner key:")
        assert shlex.split(bootstrap)[1] == "bootstrap"
        code, output = await _shell(bootstrap, env)
        assert code == 0, output
        code, listed = await _shell(_command_after(output, "Try it:"), env)
        assert code == 0, listed
        assert [env["slug"] for env in json.loads(listed)["environments"]] == ["default"]
    finally:
        await _stop(again)
