"""Statements built once and run on the database's driver directly.

SQLAlchemy builds every statement of the service and runs most of them. Those of the paths every
write or busy read takes (a write's revision and event, a registration, a key or environment read
and update, the log reads of replicas and watch streams) are declared with `prepared()` where
they are built. SQLAlchemy compiles each once per database and set of parameter names: its SQL,
the order of its parameters, and the processors of its column types that turn values into what
the driver takes and rows into what the repositories read. Each run then binds its values with
those processors, runs on the driver (`sqlite3`, asyncpg) and reads its rows back, without
SQLAlchemy's execution machinery around it.

That machinery cost more than the statements: on PostgreSQL one statement through SQLAlchemy's
asyncio layer took 163 us of CPU against 55 us on asyncpg, and a RegisterResource, four
statements in a transaction, about 2 ms of the event loop's thread. Types, SQL and errors stay
SQLAlchemy's: the same compiled SQL runs, with the same value processing, and a driver error is
raised wrapped as SQLAlchemy wraps it (see `storage.errors`).

A prepared statement must be built once at import (its identity names it, and a module-level
statement lives as long as the process), take every value as a bound parameter (no expanding
`IN`), and name every column an INSERT writes. The rows come back as named tuples; a result
offers what repositories read: iteration, `first()`, `all()`, `scalar()` and `scalars()`. Each
run fires the engine's cursor events as SQLAlchemy would (`observed`), so what listens to them
(OpenTelemetry's statement spans) sees prepared statements too.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, ScalarResult
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.util.typing import TupleAny

Process = Callable[[Any], Any]
_S = TypeVar("_S", bound=Executable)

# Every statement declared prepared, by id(): each is built once, at import, and held here, so
# that no id is ever reused.
_DECLARED: dict[int, Executable] = {}


def prepared(statement: _S) -> _S:
    """Declares a statement built once, at import, to be run on the driver (see the module)."""
    _DECLARED[id(statement)] = statement
    return statement


def is_prepared(statement: object) -> bool:
    """Whether the statement was declared with `prepared()`."""
    return id(statement) in _DECLARED


class Rows:
    """The rows of one run, all fetched; what `CursorResult` offers that repositories read."""

    __slots__ = ("_rows",)

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def first(self) -> Any | None:
        """The first row, or None."""
        return self._rows[0] if self._rows else None

    def all(self) -> list[Any]:
        """Every row."""
        return list(self._rows)

    def scalar(self) -> Any:
        """The first column of the first row, or None."""
        return self._rows[0][0] if self._rows else None

    def scalars(self) -> Rows:
        """The first column of every row."""
        return Rows([row[0] for row in self._rows])

    # The unit of work's connections hand these out where SQLAlchemy's results are typed.
    def as_cursor_result(self) -> CursorResult[*TupleAny]:
        """This result, typed as the SQLAlchemy result it stands in for."""
        return cast("CursorResult[*TupleAny]", self)

    def as_scalar_result(self) -> ScalarResult[Any]:
        """The first column of every row, typed as SQLAlchemy's scalar result."""
        return cast("ScalarResult[Any]", self.scalars())


class Plan:
    """One prepared statement compiled for one database and one set of parameter names."""

    __slots__ = ("_binding", "_readers", "_row", "_sources", "returns_rows", "sql")

    def __init__(self, statement: Executable, dialect: Dialect, keys: Sequence[str]) -> None:
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        assert isinstance(compiled, SQLCompiler)
        if compiled.positiontup is None:  # pragma: no cover - both databases bind by position
            raise ValueError("prepared statements need a driver that binds by position")
        if any(bind.expanding for bind in compiled.binds.values()):
            raise ValueError("a prepared statement cannot expand a parameter (IN): bind each value")
        # Defaults SQLAlchemy computes in Python at execution: a prepared statement would skip them.
        if compiled.insert_prefetch or compiled.update_prefetch:
            missing = [column.key for column in (*compiled.insert_prefetch, *compiled.update_prefetch)]
            raise ValueError(f"a prepared statement must be given every column it writes: {missing}")
        self.sql = compiled.string
        # Where each positional value comes from: the caller's parameter of that name, or a value
        # compiled into the statement (a literal). Told apart by asking SQLAlchemy once, with a
        # marker for each parameter.
        markers = {key: _Marker(key) for key in keys}
        values = compiled.construct_params(markers)
        assert values is not None
        sources: list[tuple[str | None, Any]] = []
        for name in compiled.positiontup:
            value = values[name]
            sources.append((value.key, None) if isinstance(value, _Marker) else (None, value))
        self._sources = tuple(sources)
        self._binding = tuple(
            (index, binder)
            for index, name in enumerate(compiled.positiontup)
            if (binder := compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)) is not None
        )
        columns = list(getattr(statement, "exported_columns", ()))
        self.returns_rows = bool(compiled.returning) or bool(getattr(statement, "is_select", False))
        self._row: type[tuple[Any, ...]] | None = None
        self._readers: tuple[tuple[int, Process], ...] = ()
        if self.returns_rows:
            # A column without a name of its own (a function's) is read by position only.
            names = [str(column.key or "") for column in columns]
            self._row = namedtuple("Row", names, rename=True)  # type: ignore[misc]
            self._readers = tuple(
                (index, reader)
                for index, column in enumerate(columns)
                if (reader := column.type.dialect_impl(dialect).result_processor(dialect, None)) is not None
            )

    def arguments(self, parameters: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional values of one run, each as the driver takes it."""
        values = [parameters[key] if key is not None else constant for key, constant in self._sources]
        for index, binder in self._binding:
            values[index] = binder(values[index])
        return tuple(values)

    def rows(self, fetched: Iterable[Sequence[Any]]) -> list[Any]:
        """The driver's rows as named tuples, each value as SQLAlchemy would have read it."""
        row = self._row
        if row is None:
            return []
        if not self._readers:
            return [row._make(values) for values in fetched]  # type: ignore[attr-defined]
        made = []
        for values in fetched:
            read = list(values)
            for index, reader in self._readers:
                read[index] = reader(read[index])
            made.append(row._make(read))  # type: ignore[attr-defined]
        return made


class _Marker:
    """Stands for a caller's parameter while a plan learns where each value comes from."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


_PLANS: dict[tuple[int, str, tuple[str, ...]], Plan] = {}


def plan(statement: Executable, dialect: Dialect, parameters: Mapping[str, Any] | None) -> Plan:
    """The statement's plan for this database and these parameter names, compiled on first use."""
    keys = tuple(parameters or ())
    key = (id(statement), dialect.name, keys)
    found = _PLANS.get(key)
    if found is None:
        found = _PLANS[key] = Plan(statement, dialect, keys)
    return found


class Run:
    """One run of a prepared statement: its plan, and the driver's values for each row it is run
    with (one, or several for executemany)."""

    __slots__ = ("arguments", "plan")

    def __init__(self, plan: Plan, arguments: list[tuple[Any, ...]]) -> None:
        self.plan = plan
        self.arguments = arguments

    @property
    def many(self) -> bool:
        """Whether it runs with several rows of values (executemany)."""
        return len(self.arguments) > 1

    def observed(self, connection: Connection) -> AbstractContextManager[None]:
        """Fires the engine's cursor events around the run (see `observed`)."""
        return observed(
            connection, self.plan.sql, self.arguments if self.many else self.arguments[0], self.many
        )


def run(statement: Executable, dialect: Dialect, parameters: Any) -> Run | None:
    """The run of a prepared statement with these parameters (a mapping, or a list of them for
    executemany); None for an empty list, which has nothing to run."""
    runs: list[Mapping[str, Any]] = parameters if isinstance(parameters, list) else [parameters or {}]
    if not runs:
        return None
    found = plan(statement, dialect, runs[0])
    return Run(found, [found.arguments(each) for each in runs])


class _Context:
    """The execution context the cursor events of one prepared run get: listeners keep their
    state on it (OpenTelemetry its span)."""


class _Failure:
    """What `handle_error` listeners get when a prepared run fails: the parts of SQLAlchemy's
    `ExceptionContext` that say which statement failed and how."""

    def __init__(
        self, connection: Connection, sql: str, arguments: Any, context: _Context, error: BaseException
    ) -> None:
        self.connection = connection
        self.engine = connection.engine
        self.dialect = connection.dialect
        self.cursor = None
        self.statement = sql
        self.parameters = arguments
        self.execution_context = context
        self.original_exception = error
        self.sqlalchemy_exception = None
        self.chained_exception = None
        self.is_disconnect = False
        self.invalidate_pool_on_disconnect = True
        self.is_pre_ping = False


_UNOBSERVED = nullcontext()


def observed(connection: Connection, sql: str, arguments: Any, many: bool) -> AbstractContextManager[None]:
    """Fires the engine's cursor events around one prepared run, as SQLAlchemy fires them around
    each statement it runs; nothing at all when nothing listens. A listener's rewrite of the
    statement is not applied: none of the service's listeners rewrites."""
    dispatch = connection.engine.dispatch
    failures = connection.dialect.dispatch.handle_error  # a dialect event since SQLAlchemy 2
    if not (dispatch.before_cursor_execute or dispatch.after_cursor_execute or failures):
        return _UNOBSERVED
    return _observed(connection, sql, arguments, many)


@contextmanager
def _observed(connection: Connection, sql: str, arguments: Any, many: bool) -> Iterator[None]:
    dispatch = connection.engine.dispatch
    context = _Context()
    for before in dispatch.before_cursor_execute:
        before(connection, None, sql, arguments, context, many)
    try:
        yield
    except Exception as error:
        for failed in connection.dialect.dispatch.handle_error:
            failed(_Failure(connection, sql, arguments, context, error))
        raise
    for after in dispatch.after_cursor_execute:
        after(connection, None, sql, arguments, context, many)
