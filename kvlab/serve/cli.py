"""`kvlab serve` (and `python -m kvlab.serve`): the command line, with vLLM's flag names.

    kvlab serve                                  # the course model on 127.0.0.1:8000
    kvlab serve path/to/model.gguf --port 8001 --kv-cache-dtype int8 --max-num-seqs 32

uvicorn runs the app and handles SIGINT/SIGTERM: it stops accepting connections, gives in-flight
requests `--timeout-graceful-shutdown` seconds to finish, cancels the rest (their handlers abort
their requests), and the app's shutdown stops the engine loop, aborting whatever is left.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal

import torch

from kvlab.quant.common import DEFAULT_BLOCK_SIZE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvlab serve", description="OpenAI-compatible server for a kvlab.LLM")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="a .gguf file or Hugging Face folder (default: the course model, SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=None, help="same as MODEL")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as `model` (default: the model file or folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    e = p.add_argument_group("engine (kvlab.LLM's options, vLLM's names)")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--kv-cache-dtype", default="auto", choices=sorted(DEFAULT_BLOCK_SIZE))
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    e.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=False)
    e.add_argument("--block-size", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--attention-backend", default=None, choices=["torch", "cpu", "triton"],
                   help="paged attention (default: torch; cpu with --fast)")
    e.add_argument("--fast", action="store_true",
                   help="serve kvlab.model.fast.FastLlama (packed, prepacked weights) with the cpu attention "
                        "backend: the same tokens, tested equal, faster on a CPU")
    e.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    e.add_argument("--num-gpu-blocks-override", type=int, default=None, help="the KV pool's size in blocks")
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    e.add_argument("--device", default="cpu")
    e.add_argument("--keep-sink-token", action="store_true")
    e.add_argument("--kv-budget-tokens", type=int, default=None,
                   help="KV entries kept per sequence (docs/architecture.md, KV eviction); default: all")
    e.add_argument("--kv-eviction", default=None, choices=["window", "streaming", "h2o", "snapkv"],
                   help="which entries a sequence over its budget keeps (default: window)")
    e.add_argument("--num-sink-tokens", type=int, default=4, help="streaming's first tokens kept")
    s = p.add_argument_group("server")
    s.add_argument("--max-queue-len", type=int, default=256,
                   help="waiting requests beyond which new ones get 503 (overload)")
    s.add_argument("--max-request-body-bytes", type=int, default=1 << 20)
    s.add_argument("--timeout-graceful-shutdown", type=float, default=10.0,
                   help="seconds in-flight requests get to finish after SIGINT/SIGTERM")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def llm_kwargs(args) -> dict:
    return dict(block_size=args.block_size, num_kv_blocks=args.num_gpu_blocks_override,
                kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                attention_backend=attention_backend(args), kv_cache_dtype=args.kv_cache_dtype,
                enable_prefix_caching=args.enable_prefix_caching, dtype=DTYPES[args.dtype], device=args.device,
                enable_chunked_prefill=args.enable_chunked_prefill, keep_sink_token=args.keep_sink_token,
                kv_budget_tokens=args.kv_budget_tokens, kv_eviction=args.kv_eviction,
                num_sink_tokens=args.num_sink_tokens)


def attention_backend(args) -> str:
    if args.attention_backend is not None:
        return args.attention_backend
    return "cpu" if args.fast else "torch"


def load(args):
    """The model argument kvlab.LLM takes: the path (or None), or with --fast the loaded model's
    fast twin and its tokenizer."""
    path = args.model or args.model_tag
    if not args.fast:
        return path
    from kvlab.model.fast import FastLlama
    from kvlab.model.load import load_model

    model, tok = load_model(path, device=args.device, dtype=DTYPES[args.dtype])
    return FastLlama.from_llama(model), tok


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    path = args.model or args.model_tag
    if path is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(path))


def _exit_cleanly(signum, frame):
    """SIGINT/SIGTERM outside uvicorn's graceful shutdown (while loading, or re-raised by uvicorn
    after it): exit with status 0 instead of a traceback or death by the signal."""
    logging.getLogger("kvlab.serve").info("%s: exiting", signal.Signals(signum).name)
    raise SystemExit(0)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    if args.model and args.model_tag and args.model != args.model_tag:
        parser().error(f"two models given: {args.model_tag} and --model {args.model}")
    if args.threads is not None:
        if args.threads < 1:
            parser().error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    import uvicorn

    from kvlab.engine.llm import LLM
    from kvlab.serve.app import build_app
    from kvlab.serve.engine_loop import engine_thread

    executor = engine_thread()   # loads, prepacks and steps the model: one OpenMP team (engine_thread)
    try:
        llm = executor.submit(lambda: LLM(load(args), **llm_kwargs(args))).result()
        app = build_app(llm, served_name(args), args.max_queue_len, args.max_request_body_bytes, executor)
    except (ValueError, FileNotFoundError) as e:
        parser().error(str(e))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.timeout_graceful_shutdown)


if __name__ == "__main__":
    main()
