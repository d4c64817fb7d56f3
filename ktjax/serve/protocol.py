"""The OpenAI API's request bodies (the fields ktjax serves) and its error object.

Types are strict, as OpenAI's are: `"temperature": "0.5"` is a bad request, not a number. Fields a
client may send that change nothing here (`user`, `metadata`, ...) are accepted and ignored; ones
whose meaning we cannot honour (`n` > 1, `logprobs`, `tools`, ...) are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "ValidationError", "error_body",
           "validation_message"]


class APIError(Exception):
    """An error the client gets as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """(one line naming the field at fault, the field) of a body that did not validate."""
    # A union's members each report an error; the deepest one says most (`content.0.type`, not "not a string").
    err = max(e.errors(include_url=False), key=lambda err: len(err["loc"]))
    param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p)) or None
    if err["type"] == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})", None
    if param is None:
        return f"the request body: {err['msg']}", None
    return f"{param}: {err['msg']}", param


def _is_type_tag(part) -> bool:
    """Whether part of an error's location names a union member's type (`str`, `list[TextPart]`)
    rather than a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part[:1].isupper() or part.startswith("function-"))


Strict = ConfigDict(strict=True, extra="allow")


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The message as chat templates take it: text content, the developer role as system."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


class SamplingFields(BaseModel):
    """What both completion endpoints share."""

    model_config = Strict
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # an extension (vLLM's): -1 or 0 is off
    ignore_eos: bool = False  # an extension (vLLM's, SGLang's): generate through end-of-sequence (benchmarks)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    presence_penalty: float | None = Field(None, ge=0, le=0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("log probabilities are not supported by this server")
        return None

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = Field(None, max_length=0)
    # Extensions, as vLLM and SGLang name them: template options (`thinking`), and whether R1's
    # reasoning comes apart from the answer (default: the server's --reasoning setting).
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool | None = None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def thinking(self) -> bool | None:
        kw = self.chat_template_kwargs or {}
        value = kw.get("thinking", kw.get("enable_thinking"))
        return None if value is None else bool(value)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = Field(False, le=False)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = Field(None, max_length=0)

    def the_prompt(self) -> str | list[int]:
        """The one prompt (a batch of prompts is refused: one choice per request here)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt: {len(p)} prompts in one request; this server takes one", param="prompt")
            p = p[0]
        if isinstance(p, list) and not p:
            raise APIError(400, "prompt: empty list of token ids", param="prompt")
        return p
