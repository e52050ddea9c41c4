"""Beyond one GPU's KV cache: models of eviction, tiered offload, KV-aware routing and
prefill/decode disaggregation (chapter 12).

Every module here is a *model*: a simulation driven by published hardware numbers and analytic
costs (`kvlab.costs.forward_cost`), not a measurement of a real cluster. Each number carries its source.

- `hardware`  -- link and storage bandwidths and capacities, each with its datasheet
- `sessions`  -- multi-turn chat traces whose prompts share system prompts and history
- `eviction`  -- a block-budgeted prefix cache with LRU, LFU and cost-aware (GDSF) eviction
- `offload`   -- GPU HBM / CPU DRAM / SSD tiers, and when reloading a prefix beats recomputing it
- `routing`   -- round-robin, least-loaded and prefix-aware routing over N replicas
- `disagg`    -- a discrete-event model of colocated vs disaggregated prefill and decode
"""
