"""The one mapping from domain errors to gRPC statuses with google.rpc details (AIP-193)."""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service.domain.errors import (
    AlreadyExists,
    Conflict,
    Denied,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

ERROR_DOMAIN = "environments.agentpost.dev"

_CODES: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Conflict: grpc.StatusCode.ABORTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Denied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: DomainError) -> grpc.StatusCode:
    """The canonical code of a domain error (its nearest mapped class)."""
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: DomainError) -> tuple[grpc.StatusCode, str, bytes]:
    """Code, message and the serialized google.rpc.Status (ErrorInfo, BadRequest when there are
    field violations, RetryInfo when the error says when to retry) for a domain error."""
    code = status_code(error)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    status.details.append(
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))
    )
    if error.violations:
        status.details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, ResourceExhausted) and error.retry_after is not None:
        delay = duration_pb2.Duration()
        # Whole milliseconds, rounded up: retrying a moment early would only be refused again.
        delay.FromMilliseconds(max(1, math.ceil(error.retry_after * 1000)))
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return code, error.message, status.SerializeToString()


def internal_status(request_id: str) -> tuple[grpc.StatusCode, str, bytes]:
    """The status of a fault of the service itself; names the request id so logs can be found."""
    code = grpc.StatusCode.INTERNAL
    message = f"internal error; request id {request_id}"
    status = status_pb2.Status(code=code_pb2.INTERNAL, message=message)
    status.details.append(
        _pack(
            error_details_pb2.ErrorInfo(
                reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"requestId": request_id}
            )
        )
    )
    return code, message, status.SerializeToString()


async def abort(
    context: grpc.aio.ServicerContext,
    status: tuple[grpc.StatusCode, str, bytes],
    request_id: str | None,
    extra_trailers: tuple[tuple[str, str], ...] = (),
) -> None:
    """Ends the call with the status, echoing the request id (and `extra_trailers`) in the
    trailers."""
    code, message, details = status
    trailers: list[tuple[str, str | bytes]] = [("grpc-status-details-bin", details)]
    if request_id:
        trailers.append(("x-request-id", request_id))
    trailers.extend(extra_trailers)
    await context.abort(code, message, trailing_metadata=tuple(trailers))
