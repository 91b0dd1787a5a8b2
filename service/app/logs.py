"""Log lines carry the call's request id (`x-request-id`, or one made up for the call) and method.

Two formats: `text` (the default, for people) and `json` (one object per line, for log
pipelines) with the fields `time` (UTC, ISO 8601), `level`, `logger`, `message`, `request_id`
and `method` (null outside a call), `code` and `duration_ms` (set on access log lines, else
null), and `exception` when there is one.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from datetime import UTC, datetime
from typing import IO, Any, Literal

from service.domain.calls import current_request_id
from service.domain.redaction import printable, redacted
from service.transport.context import current_method

LogFormat = Literal["text", "json"]

_base_factory = logging.getLogRecordFactory()


def _record_with_call(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.request_id = current_request_id.get()
    record.call_method = current_method.get()
    return record


def install_request_ids() -> None:
    """Every log record made from now on carries `request_id` and `method`, whichever handler
    writes it."""
    logging.setLogRecordFactory(_record_with_call)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object."""
        request_id = getattr(record, "request_id", "-")
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": None if request_id == "-" else request_id,
            "method": getattr(record, "call_method", None),
            "code": getattr(record, "code", None),
            "duration_ms": getattr(record, "duration_ms", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class _Cleaned(logging.Filter):
    """Every message, this service's and its libraries' (OpenTelemetry quotes the trace headers it
    cannot parse), is written without secrets and, in text, on one line: a caller's value cannot
    forge a line or send terminal escapes."""

    def __init__(self, one_line: bool) -> None:
        super().__init__()
        self._one_line = one_line

    def filter(self, record: logging.LogRecord) -> bool:
        message = redacted(record.getMessage())
        record.msg, record.args = printable(message) if self._one_line else message, None
        return True


# Characters a request id keeps in a text line as they are; any other is %-escaped there, so that
# an id holding "] " or another field's look cannot pass for fields of its own. JSON keeps it as sent.
_PLAIN_IN_TEXT = "-._~:/@+=,;!*$&'()"


class _TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id] message`, the request id escaped (see `_PLAIN_IN_TEXT`)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id_text)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.request_id_text = urllib.parse.quote(
            str(getattr(record, "request_id", "-")), safe=_PLAIN_IN_TEXT
        )
        return super().format(record)


def handler(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing to `stream` (stderr by default) in the given format."""
    made = logging.StreamHandler(stream)
    made.addFilter(_Cleaned(one_line=log_format != "json"))
    if log_format == "json":
        made.setFormatter(JsonFormatter())
    else:
        made.setFormatter(_TextFormatter())
    return made


def configure(level: str, log_format: LogFormat = "text") -> None:
    """Root logging to stderr, with the request id in each line."""
    install_request_ids()
    root = logging.getLogger()
    root.handlers[:] = [handler(log_format)]
    root.setLevel(level.upper())
