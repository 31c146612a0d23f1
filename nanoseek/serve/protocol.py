"""The OpenAI wire protocol of the server: configuration, request models, errors, response pieces.

Every error the server sends is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`
with a 4xx/5xx status (APIError -> error_response). Request models follow OpenAI's completions
and chat completions, plus `top_k` and the `thinking` switch; unknown fields are accepted and
ignored, as OpenAI's API does. Floats must be finite (no NaN/Infinity literals), seeds fit 63
bits (the request's torch.Generator), and no string may hold a lone UTF-16 surrogate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

SEED_LIMIT = 1 << 63  # seeds are in [0, 2**63): a request's torch.Generator takes 63 bits


@dataclass
class ServeConfig:
    model_name: str = "nanoseek"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON
    max_prompt_tokens: int | None = None  # default: what the engine's cache holds
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none (chat; completions default to 16 as OpenAI)
    max_concurrent: int = 64  # requests in flight (streaming or not); more get 429
    max_n: int = 8
    shutdown_timeout: float = 10.0  # on SIGTERM: seconds running requests get to finish
    retry_after_s: int = 1  # the Retry-After header of a 429


# -------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------


class APIError(Exception):
    """An OpenAI-shaped error; raise it anywhere in a route and the client gets it as JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: text the client sent (a lone surrogate included) can always
    be echoed back in an error message."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(e: APIError) -> JSONResponse:
    return SafeJSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; the request was ended before it finished",
                    type="server_error", code="server_shutting_down")


def check_strings(value: Any, where: str = "") -> None:
    """Raise a 400 APIError naming the field if any string in `value` holds a lone surrogate
    (valid JSON, \\ud800, but not UTF-8: no tokenizer or response can carry it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where or 'a string'} holds a lone UTF-16 surrogate, which is not text",
                           param=where or None, code="invalid_string") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_strings(k, where)
            check_strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_strings(v, f"{where}[{i}]" if where else f"[{i}]")


# -------------------------------------------------------------------------------------------
# Requests (OpenAI's, plus top_k and the thinking switch)
# -------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=SEED_LIMIT)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(CommonRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    suffix: Optional[str] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: Optional[int] = None


class ChatCompletionRequest(CommonRequest):
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    thinking: Optional[Union[bool, dict[str, Any]]] = None
    reasoning_effort: Optional[Literal["high", "max"]] = None

    @property
    def thinking_mode(self) -> str:
        th = self.thinking
        if isinstance(th, dict):
            th = th.get("type") in ("enabled", True)
        return "thinking" if th else "chat"


def validation_error(errs: list[dict]) -> APIError:
    """A pydantic/FastAPI validation error list -> one 400 APIError (param = the first field)."""
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":  # loc is ("body", character offset): not a parameter
        ctx = first.get("ctx") or {}
        where = f" ({ctx['error']})" if ctx.get("error") else ""
        return APIError(400, f"could not parse the request body as JSON{where}", code="json_invalid")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                    for er in errs[:5])
    return APIError(400, msg, param=".".join(loc) or None, code=first.get("type"))


# -------------------------------------------------------------------------------------------
# Response pieces
# -------------------------------------------------------------------------------------------


def finish_reason(reason: str) -> str:
    """The engine's finish reason -> OpenAI's ("length" or "stop")."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int, seqs=(), speculative: bool = False) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if speculative:  # MTP speculative decoding: drafts are "predictions", in OpenAI's usage fields
        drafted = sum(q.spec_drafted for q in seqs)
        accepted = sum(q.spec_accepted for q in seqs)
        u["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                          "rejected_prediction_tokens": drafted - accepted}
    return u
