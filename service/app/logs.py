"""Log lines carry the call's request id (`x-request-id`, or one made up for the call)."""

from __future__ import annotations

import logging
from typing import Any

from service.domain.calls import current_request_id

_base_factory = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.request_id = current_request_id.get()
    return record


def install_request_ids() -> None:
    """Every log record made from now on carries `request_id`, whichever handler writes it."""
    logging.setLogRecordFactory(_record_with_request_id)


def configure(level: str) -> None:
    """Root logging to stderr, with the request id in each line."""
    install_request_ids()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
