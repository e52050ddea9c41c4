"""The OpenAI-compatible wire format: request bodies (pydantic), their SamplingParams, response
and streaming-chunk bodies, and the error body.

Fields follow OpenAI's completions and chat completions APIs; vLLM's extensions `top_k`,
`ignore_eos`, `stop_token_ids`, `cache_salt` and `return_token_ids` are accepted too. Fields
kvlab does not implement (`logprobs`, `echo`, penalties, `n > 1`, ...) are rejected with a 400
that names them rather than silently ignored.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvlab.engine.sampling import SamplingParams


class RequestError(ValueError):
    """A request the server refuses: HTTP status, OpenAI error type and the offending parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = 400) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """What completions and chat share."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = None
    cache_salt: str | None = None
    return_token_ids: bool = False
    # accepted by OpenAI, not implemented here: a request that sets them gets a 400
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams; every value out of range is a RequestError naming it."""
        if self.n != 1:
            raise RequestError(f"n must be 1 (kvlab returns one choice per prompt), got {self.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise RequestError(f"{name} is not supported by kvlab (only 0)", name)
        for name in ("logit_bias", "logprobs"):
            if getattr(self, name) not in (None, False, 0):
                raise RequestError(f"{name} is not supported by kvlab", name)
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k == 0 or self.top_k < -1:
            raise RequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}", "top_k")
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=max_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              seed=self.seed, ignore_eos=self.ignore_eos)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list:
        """One string or token-id list per choice (OpenAI accepts a batch of prompts)."""
        if self.echo or (self.best_of not in (None, 1)) or self.suffix:
            name = "echo" if self.echo else "best_of" if self.best_of not in (None, 1) else "suffix"
            raise RequestError(f"{name} is not supported by kvlab", name)
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise RequestError("prompt must not be empty", "prompt")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"message content parts must be text; got type {part.get('type')!r}",
                                   "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def conversation(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class StreamText:
    """What a stream may send of a request's growing text, chunk by chunk.

    `next(text, finished)` takes the request's whole completion text so far and returns the new part
    to send. While the request runs it holds back a partial character (the decoder's U+FFFD at the
    end, while a character's bytes are split over tokens) and the last len(longest stop string) - 1
    characters, which a stop string might still claim (the engine then cuts the text before it).
    Once finished, everything not yet sent goes. Sent text is never taken back.
    """

    def __init__(self, stop: list[str] | None = None):
        self.sent, self.holdback = "", max((len(s) for s in stop or []), default=1) - 1

    def next(self, text: str, finished: bool) -> str:
        if not finished:
            text = text.rstrip("\ufffd")
            text = text[:max(len(self.sent), len(text) - self.holdback)]
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


# ---- responses ---------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, token_ids=None,
                      prompt_token_ids=None, chat: bool = False, delta: bool = False) -> dict:
    """One choice of a response (delta=False) or of a streaming chunk (delta=True)."""
    if chat:
        body = {"index": index}
        if delta:
            body["delta"] = {"content": text} if text else {}
        else:
            body["message"] = {"role": "assistant", "content": text}
        body |= {"logprobs": None, "finish_reason": finish_reason}
    else:
        body = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        body["token_ids"] = list(token_ids)
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = list(prompt_token_ids)
    return body


def response(request_id: str, model: str, choices: list[dict], chat: bool, chunk: bool,
             usage_: dict | None = None, created: int | None = None) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()) if created is None else created,
            "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body
