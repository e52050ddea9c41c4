"""The FastAPI app: OpenAI-compatible endpoints over one EngineLoop.

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events, then [DONE])
    GET  /v1/models, /health, /metrics

Every refusal is OpenAI's error body with a status: 400 for a bad request (validation, limits,
unknown model, malformed JSON, a body over `max_body_bytes`), 404/405 for unknown routes, 503 when
more than `max_waiting` requests wait. A handler whose client disconnects aborts its requests, and
the engine frees their blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvlab.serve.engine_loop import EngineLoop, Failure, Overloaded
from kvlab.serve.metrics import CONTENT_TYPE, ServerMetrics
from kvlab.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    StreamText,
    completion_choice,
    error_body,
    response,
    usage,
)

DEFAULT_MAX_BODY_BYTES = 1 << 20


def _error(status: int, message: str, type: str = "invalid_request_error", param=None, headers=None):
    return JSONResponse(error_body(message, type, param, status), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 400 before any handler reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        msg = f"the request body is over the limit of {self.limit} bytes (--max-request-body-bytes)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error(400, msg, param="body")(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await _error(400, msg, param="body")(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():   # the body once, then the real channel (a disconnect shows up there)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(body) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def build_app(llm, model_name: str, max_waiting: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              executor=None):
    """The ASGI app serving `llm` (a kvlab.LLM with a tokenizer) under the name `model_name`; the engine
    steps on `executor` (kvlab.serve.engine_loop.engine_thread: pass the one that built `llm`)."""
    if llm.tokenizer is None:
        raise ValueError("the server needs a model with a tokenizer (text prompts and chat templates)")
    metrics = ServerMetrics(model_name)
    engine = EngineLoop(llm, metrics, max_waiting, executor)
    tokenizer = copy.deepcopy(llm.tokenizer)   # the engine thread decodes with its own; never share one
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="kvlab", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        if errs and errs[0].get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {errs[0].get('ctx', {}).get('error', '')}".strip())
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                 for e in errs[:5]]
        loc = [str(x) for x in (errs[0].get("loc", ()) if errs else ()) if x != "body"]
        return _error(400, "; ".join(parts) or "invalid request", param=loc[0] if loc else None)

    @app.exception_handler(RequestError)
    async def _refused(request, exc: RequestError):
        return _error(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(Overloaded)
    async def _overloaded(request, exc: Overloaded):
        return _error(503, str(exc), "server_overloaded", headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404
                      else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return _error(503, engine.error or "the engine loop is not running", "server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kvlab", "max_model_len": llm.max_model_len}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise RequestError(f"The model `{name}` does not exist; this server serves `{model_name}`",
                               "model", type="invalid_request_error")

    def budget(req, prompt_ids: list[int], default: int | None) -> int:
        """max_tokens for one prompt, refused when prompt + max_tokens exceeds max_model_len."""
        n, limit = len(prompt_ids), llm.max_model_len
        if n >= limit:
            raise RequestError(f"the prompt has {n} tokens but this model's maximum context length is "
                               f"{limit} tokens (prompt plus at least one generated token)", "prompt")
        max_tokens = default if default is not None else limit - n
        if n + max_tokens > limit:
            raise RequestError(f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). "
                               "Reduce the prompt or max_tokens.", "max_tokens")
        return max_tokens

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = [p if isinstance(p, list) else list(tokenizer.encode(p)) for p in req.prompts()]
        vocab = llm.config.vocab_size
        for p in prompts:
            if any(not 0 <= t < vocab for t in p):
                raise RequestError(f"prompt token ids must lie in [0, {vocab})", "prompt")
        default = 16 if req.max_tokens is None else req.max_tokens
        return await generate(request, req, prompts, [budget(req, p, default) for p in prompts], chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        try:
            ids = tokenizer.apply_chat_template(req.conversation(), add_generation_prompt=True, tokenize=True)
        except RequestError:
            raise
        except Exception as e:   # the template itself refuses (e.g. roles out of order)
            raise RequestError(f"the chat template refused the messages: {e}", "messages") from None
        ids = [int(t) for t in (ids if isinstance(ids, list) else ids["input_ids"])]
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await generate(request, req, [ids], [budget(req, ids, limit)], chat=True)

    async def generate(request: Request, req, prompts: list[list[int]], max_tokens: list[int], chat: bool):
        arrival = time.perf_counter()
        params = [req.sampling_params(m) for m in max_tokens]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        rids = [f"{rid}-{i}" for i in range(len(prompts))]
        queue: asyncio.Queue = asyncio.Queue()
        try:   # all prompts reach the engine at the same step boundary
            results = await asyncio.gather(*(engine.submit(p, sp, r, req.cache_salt, arrival, queue)
                                             for r, p, sp in zip(rids, prompts, params)), return_exceptions=True)
        except BaseException:   # the client left while waiting for the step boundary
            for r in rids:
                engine.abort(r)
            raise
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:   # a bad prompt (ValueError from the engine) or overload: none of them runs
            for r in rids:
                engine.abort(r)
            bad = next((e for e in errors if isinstance(e, ValueError)), None)
            if bad is not None:
                raise RequestError(str(bad), "prompt") from None
            raise errors[0]
        index = {r: i for i, r in enumerate(rids)}
        if req.stream:
            return StreamingResponse(stream(req, rid, rids, index, queue, chat, params),
                                     media_type="text/event-stream")
        return await collect(request, req, rid, rids, index, queue, chat)

    async def collect(request, req, rid, rids, index, queue, chat):
        outputs, watch = {}, asyncio.ensure_future(_wait_disconnect(request))
        try:
            while len(outputs) < len(rids):
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:   # the client left: nobody will read the answer
                    get.cancel()
                    return Response(status_code=499)
                item = get.result()
                if isinstance(item, Failure):
                    return _error(503, item.message, "server_error")
                if item.output.finished:
                    outputs[item.output.request_id] = item.output
        finally:
            watch.cancel()
            for r in rids:
                if r not in outputs:
                    engine.abort(r)
        choices, n_prompt, n_gen = [], 0, 0
        for r in rids:
            out = outputs[r]
            comp = out.outputs[0]
            ids = comp.token_ids if req.return_token_ids else None
            pids = out.prompt_token_ids if req.return_token_ids else None
            choices.append(completion_choice(index[r], comp.text, comp.finish_reason, ids, pids, chat))
            n_prompt += len(out.prompt_token_ids)
            n_gen += len(comp.token_ids)
        return response(rid, model_name, choices, chat, chunk=False, usage_=usage(n_prompt, n_gen))

    async def stream(req, rid, rids, index, queue, chat, params):
        finished, deltas = set(), [StreamText(p.stop) for p in params]
        n_prompt = n_gen = 0
        try:
            if chat:   # OpenAI's first chunk names the role
                for i in range(len(rids)):
                    first = completion_choice(i, "", None, chat=True, delta=True)
                    first["delta"] = {"role": "assistant", "content": ""}
                    yield _sse(response(rid, model_name, [first], chat, chunk=True))
            while len(finished) < len(rids):
                item = await queue.get()
                if isinstance(item, Failure):
                    yield _sse(error_body(item.message, "server_error", None, 503))
                    return
                out = item.output
                comp, i = out.outputs[0], index[out.request_id]
                text = deltas[i].next(comp.text, out.finished)
                if text or out.finished or req.return_token_ids:
                    ids = out.new_token_ids if req.return_token_ids else None
                    choice = completion_choice(i, text, comp.finish_reason if out.finished else None, ids,
                                               chat=chat, delta=True)
                    yield _sse(response(rid, model_name, [choice], chat, chunk=True))
                if out.finished:
                    finished.add(out.request_id)
                    n_prompt += len(out.prompt_token_ids)
                    n_gen += len(comp.token_ids)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield _sse(response(rid, model_name, [], chat, chunk=True, usage_=usage(n_prompt, n_gen)))
            yield _sse("[DONE]")
        finally:   # the client left (the generator is closed or cancelled): stop its requests
            for r in rids:
                if r not in finished:
                    engine.abort(r)

    return app
