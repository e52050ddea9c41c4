"""The paged inference engine.

    sequence       one request as the engine sees it (who writes which field: its docstring)
    scheduler      Schedule / ScheduledChunk: which tokens of which sequences the next step computes
    block_manager  block tables, refcounts, block-hash prefix caching (radix_cache: the radix tree)
    model_runner   a Schedule -> one packed forward over the paged cache
    core           EngineCore: schedule, run, sample, stop, finish (the step loop)
    kv_budget      how the KV memory (blocks, residual and sink rows) is split at start-up
    protocols      the seams a part plugs into: policy, block allocator, KV format, backend, scheduler,
                   engine core (the last two as factories)
    llm            kvlab.LLM, the vLLM-shaped API
"""
