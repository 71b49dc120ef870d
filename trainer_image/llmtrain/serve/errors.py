"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request that cannot be served; the server answers it and keeps going."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """400: the request itself is wrong (the client must change it)."""
    return ApiError(400, message, param=param, code=code)


def not_ready(message: str) -> ApiError:
    """503: the server cannot take work now (loading or shutting down); retrying elsewhere helps."""
    return ApiError(503, message, code="service_unavailable", type_="server_error")
