"""Errors that carry the gRPC status they must be answered with.

Handlers raise these; servicers turn them into ``context.abort(code, message)`` so every
bad input gets a precise status and the server keeps serving.
"""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """Base class: an error with a gRPC status code and a message for the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(InferenceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(InferenceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(InferenceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(InferenceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(InferenceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
