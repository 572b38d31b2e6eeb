"""The one place where exceptions become HTTP statuses and OpenAI-style error bodies.

Handlers raise (typed engine errors, ``APIError`` for server-side checks) and never build error
responses themselves, so every route answers the same shape: ``{"error": {"message", "type",
"param", "code"}}``, as vLLM does. Anything unexpected is a 500 and is logged with its traceback.
"""
from __future__ import annotations

import json
import logging
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from loraplex.engine.wire import EngineCoreError
from loraplex.errors import (EngineDeadError, EngineStepError, InvalidRequestError, LoRAAlreadyLoadedError,
                             LoRADisabledError, LoRAError, LoRANotFoundError)

logger = logging.getLogger("loraplex.server")

# Error "type" strings: vLLM's for the statuses it uses, OpenAI client class names for the others.
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "PayloadTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error the server detects itself, with the status and vLLM type it must answer with."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type or _TYPES.get(self.status, HTTPStatus(self.status).phrase.replace(" ", ""))
        self.param = param


class EngineUnavailableError(Exception):
    """The engine loop is stopped or dead: requests cannot be served (503)."""


def to_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail))
    if isinstance(exc, LoRANotFoundError):
        return APIError(404, str(exc))
    if isinstance(exc, LoRAAlreadyLoadedError):
        return APIError(400, str(exc), "InvalidUserInput")
    # LoRALoadError covers LoRARankError: vLLM answers 500 for a rank too high; loraplex says 400.
    if isinstance(exc, (InvalidRequestError, LoRADisabledError, LoRAError)):
        return APIError(400, str(exc))
    if isinstance(exc, (EngineStepError, EngineCoreError)):  # logged with its cause where it happened
        return APIError(500, str(exc))
    if isinstance(exc, (EngineUnavailableError, EngineDeadError)):  # the in-thread engine raises the latter
        return APIError(503, str(exc) or "The engine is not running")
    logger.error("unhandled error while serving a request", exc_info=exc)
    return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}")


def error_body(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}}


def error_response(exc: BaseException) -> JSONResponse:
    err = to_api_error(exc)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


def sse_error(exc: BaseException) -> str:
    """An error after a stream started: its status line is already sent, so the error rides in an event."""
    return f"data: {json.dumps(error_body(to_api_error(exc)))}\n\n"


async def _handler(request, exc: Exception) -> JSONResponse:
    return error_response(exc)


# For what happens outside the route handlers (unknown path, wrong method).
EXCEPTION_HANDLERS = {HTTPException: _handler}
