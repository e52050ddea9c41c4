"""An OpenAI-compatible HTTP server for kvlab.LLM (FastAPI + uvicorn, Prometheus metrics).

    kvlab serve --port 8000          # or: python -m kvlab.serve

Modules: protocol (request and response bodies), engine_loop (the one loop that steps the engine
for every connection), metrics (/metrics with vLLM's names), app (the endpoints), cli (the flags).
Needs the `serve` extra: pip install -e ".[serve]".
"""
