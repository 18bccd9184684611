"""One error hierarchy for every croft service.

Services raise these; `grpc_status()` and `http_status()` map them in exactly one place to
gRPC status codes (between services) and to LXD's error envelope (at the REST edge).
"""

from __future__ import annotations

import grpc


class CroftError(Exception):
    """Base of every error croft raises on purpose. `message` is meant for a person."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(CroftError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(CroftError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Conflict(CroftError):
    """The thing exists already, or changed under the caller (a failed compare-and-swap)."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class PreconditionFailed(CroftError):
    """An ETag / If-Match mismatch at the REST edge."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 412


class PermissionDenied(CroftError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Unauthenticated(CroftError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class Unavailable(CroftError):
    """A dependency (etcd, another service) cannot be reached right now; retrying may help."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Timeout(CroftError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Cancelled(CroftError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 400


class NotImplementedYet(CroftError):
    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 501


class Internal(CroftError):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500


_BY_GRPC_CODE: dict[grpc.StatusCode, type[CroftError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Conflict,
        PreconditionFailed,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        Timeout,
        Cancelled,
        NotImplementedYet,
        Internal,
    )
}


def from_grpc(code: grpc.StatusCode, message: str) -> CroftError:
    """The error a gRPC status stands for, so that a NotFound raised in storage is a
    NotFound in the api service that called it."""
    return _BY_GRPC_CODE.get(code, Internal)(message)


def lxd_error_envelope(error: CroftError) -> dict[str, object]:
    """LXD's error response body for an error."""
    return {
        "type": "error",
        "status": "",
        "status_code": 0,
        "operation": "",
        "error_code": error.http_status,
        "error": error.message,
        "metadata": None,
    }
