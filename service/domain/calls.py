"""What is known about the call being served, wherever in the call's task it is needed.

The interceptor sets the request id before a handler runs; a write sets the revision it committed,
which the interceptor then answers in `x-agentpost-revision`. Both are ContextVars, so each call
(its own task) sees only its own values.
"""

from __future__ import annotations

from contextvars import ContextVar

current_request_id: ContextVar[str] = ContextVar("current_request_id", default="-")
committed_revision: ContextVar[int | None] = ContextVar("committed_revision", default=None)
# A stream's progress: the revision it has delivered everything up to (WatchEvents), answered in
# the stream's trailing metadata however it ends, so the client resumes from it.
reached_revision: ContextVar[int | None] = ContextVar("reached_revision", default=None)
