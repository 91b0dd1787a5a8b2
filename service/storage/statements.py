"""What a repository runs its statements on: one connection inside one unit of work.

On PostgreSQL that is SQLAlchemy's `AsyncConnection` itself; on SQLite it is `InlineStatements`
(see inline_sqlite), which runs SQLAlchemy's synchronous Core on the event loop's thread. Both
answer with the same buffered results, typed as `AsyncConnection` types them, so a repository is
written once for both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Never, Protocol, TypeVar, TypeVarTuple, overload

from sqlalchemy import CursorResult, ScalarResult
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.sql.base import Executable
from sqlalchemy.util.typing import TupleAny

if TYPE_CHECKING:
    from sqlalchemy.sql.selectable import TypedReturnsRows

_T = TypeVar("_T", bound=Any)
_Ts = TypeVarTuple("_Ts")


class Statements(Protocol):
    """Runs Core statements in the unit of work's transaction."""

    @property
    def dialect(self) -> Dialect:
        """The database's dialect (for the few statements spelled per database)."""
        ...

    @overload
    async def execute(
        self, statement: TypedReturnsRows[*_Ts], parameters: Any = None
    ) -> CursorResult[*_Ts]: ...
    @overload
    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[*TupleAny]: ...
    async def execute(self, statement: Executable, parameters: Any = None) -> CursorResult[*TupleAny]:
        """The statement's result, its rows already fetched."""
        ...

    @overload
    async def scalar(self, statement: TypedReturnsRows[Never], parameters: Any = None) -> Any | None: ...
    @overload
    async def scalar(self, statement: TypedReturnsRows[_T], parameters: Any = None) -> _T | None: ...
    @overload
    async def scalar(self, statement: Executable, parameters: Any = None) -> Any: ...
    async def scalar(self, statement: Executable, parameters: Any = None) -> Any:
        """The first column of the first row, or None."""
        ...

    @overload
    async def scalars(self, statement: TypedReturnsRows[_T], parameters: Any = None) -> ScalarResult[_T]: ...
    @overload
    async def scalars(self, statement: Executable, parameters: Any = None) -> ScalarResult[Any]: ...
    async def scalars(self, statement: Executable, parameters: Any = None) -> ScalarResult[Any]:
        """The first column of every row."""
        ...
