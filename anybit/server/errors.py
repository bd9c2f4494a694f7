"""OpenAI-style errors: one exception type and the JSON error body.

In: a status code and message raised anywhere in a request handler (``OpenAIError``), a pydantic
``ValidationError`` / FastAPI ``RequestValidationError``, or a ``ValueError("<field>: ...")`` from
``SamplingParams`` / the engine. Out: ``JSONResponse`` with
``{"error": {"message", "type", "param", "code"}}``. Called by ``server/app.py`` (exception
handlers, middleware) and ``server/serving.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from anybit.server.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}
_FIELD_PREFIX = re.compile(r"^(?:Value error, )?([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


class OpenAIError(Exception):
    """An error that becomes an OpenAI error body with the given HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error")

    def response(self) -> JSONResponse:
        return error_response(self.message, self.status, self.param, self.code, self.err_type)


def error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None,
               err_type: str | None = None) -> dict[str, Any]:
    info = ErrorInfo(message=message, type=err_type or _TYPES.get(status, "invalid_request_error"),
                     param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(message: str, status: int = 400, param: str | None = None, code: str | None = None,
                   err_type: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(message, status, param, code, err_type), status_code=status,
                        headers=headers)


def _loc_to_param(loc: Sequence[Any]) -> str | None:
    parts = [p for p in loc if p != "body"]
    # pydantic reports which union member failed ("str", "list[str]", "function-after[...]"):
    # keep only field names and list indices.
    out: list[str] = []
    for p in parts:
        if isinstance(p, int):
            out.append(f"[{p}]")
        elif isinstance(p, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) and p not in (
                "str", "int", "float", "bool", "list", "dict"):
            out.append(("." if out else "") + p)
    return "".join(out) or None


def _split_field(message: str) -> tuple[str | None, str]:
    m = _FIELD_PREFIX.match(message)
    return (m.group(1) if m else None), message.removeprefix("Value error, ")


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> OpenAIError:
    """pydantic ``e.errors()`` -> one 400 error naming the first offending field."""
    if not errors:
        return OpenAIError("invalid request body", param=None, code="invalid_value")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return OpenAIError(f"request body is not valid JSON: {msg}", code="invalid_json")
    param = _loc_to_param(loc)
    if param is None:
        field, rest = _split_field(msg)
        if field is not None:
            return OpenAIError(rest, param=field, code="invalid_value")
        if first.get("type") == "model_type":
            return OpenAIError("request body must be a JSON object", code="invalid_value")
    else:
        msg = f"{param}: {msg.removeprefix('Value error, ')}"
        if first.get("type") == "missing":
            return OpenAIError(f"{param}: field required", param=param, code="missing_required_parameter")
    return OpenAIError(msg, param=param, code="invalid_value")


def from_value_error(exc: ValueError) -> OpenAIError:
    """``ValueError("temperature: must be >= 0")`` -> 400 with ``param="temperature"``."""
    field, _ = _split_field(str(exc))
    return OpenAIError(str(exc), param=field, code="invalid_value")
