"""The chapters' helpers: small instruments a notebook uses to show, trace or judge the engine.

    attention_math   attention written out step by step (chapter 01), repeat_kv, masks
    watch            which (layer, token) K/V each step computes or holds; figure and GIF (chapter 03)
    claims           the claims table of chapter 05 (stated vs computed, verdict, reason)
    fragmentation    KV memory waste of contiguous vs paged allocation on a trace (chapter 06)
    batching         static vs continuous batching simulated on a trace (chapter 07)
    traces           synthetic request traces with documented distributions (chapters 06, 07, 11, 12)

They read the engine (kvlab.engine, kvlab.cache, kvlab.model) and the cost calculators
(kvlab.costs); the engine (kvlab.engine, cache, model, attention, kernels, quant) never imports them.
"""
