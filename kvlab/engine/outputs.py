"""What the engine hands back, shaped like vLLM's RequestOutput and CompletionOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" (EOS, stop token or string), "length", "abort"


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float                 # time.perf_counter() seconds
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache
    new_token_ids: list[int] = field(default_factory=list)   # produced by the step that returned this
