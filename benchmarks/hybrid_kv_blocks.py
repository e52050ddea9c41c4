"""Peak KV blocks of a Gemma-2-shaped model (random weights): KV cache groups against one table.

    python benchmarks/hybrid_kv_blocks.py [--window 16] [--prompt 512] [--gen 64] [--seqs 4]

Runs `kvlab.model.presets` gemma2-tiny (windowed and full layers alternating) through kvlab.LLM
twice on the same prompts: with KV cache groups (the default: kvlab/engine/kv_groups.py) and with
the one block table a mixed model had before them (reached here through a KV budget that never
cuts, kv_budget_tokens=10**6). Prints, per run, the peak block ids in use after any step, the bytes
of one block id, the peak KV bytes in use, and whether the greedy tokens agree. Deterministic
(block counts, not times).
"""
from __future__ import annotations

import argparse

import torch

import kvlab
from kvlab.model.presets import random_model


def peak_blocks(llm, prompts, gen):
    params = kvlab.SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    rids = [llm.add_request(p, params) for p in prompts]
    seqs = [llm.engine.requests[r] for r in rids]
    peak = decode_peak = 0
    while llm.has_unfinished_requests():
        llm.step()
        in_use = llm.num_kv_blocks - llm.block_manager.num_free_blocks
        peak = max(peak, in_use)
        if all(s.num_computed_tokens == len(s) - 1 > s.num_prompt_tokens for s in llm.scheduler.running):
            decode_peak = max(decode_peak, in_use)           # every running sequence decoded this step
    return peak, decode_peak, [s.completion_token_ids for s in seqs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="chunked prefill with this token budget")
    a = ap.parse_args(argv)
    model = random_model("gemma2-tiny", sliding_window=a.window, max_position_embeddings=2 * (a.prompt + a.gen))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (a.prompt,), generator=g).tolist() for _ in range(a.seqs)]
    budget = 64 * 2**20
    common = dict(block_size=a.block_size, kv_cache_memory_bytes=budget, enable_prefix_caching=False,
                  max_model_len=a.prompt + a.gen + 1, enable_chunked_prefill=a.chunk is not None,
                  max_num_batched_tokens=a.chunk, max_num_seqs=a.seqs)
    runs = {"groups": kvlab.LLM(model, **common), "one table": kvlab.LLM(model, **common, kv_budget_tokens=10**6)}
    print(f"gemma2-tiny, window {a.window}, {a.seqs} x ({a.prompt} prompt + {a.gen} generated), block_size "
          f"{a.block_size}, chunked prefill {a.chunk}")
    tokens = {}
    for name, llm in runs.items():
        peak, decode_peak, tokens[name] = peak_blocks(llm, prompts, a.gen)
        b = llm.bytes_per_block
        print(f"  {name:9s}: {b} B per block id; peak {peak} ids in use = {peak * b} B; "
              f"peak over decode steps {decode_peak} ids = {decode_peak * b} B "
              f"(preemptions {llm.scheduler.num_preemptions})")
    print(f"  same greedy tokens: {tokens['groups'] == tokens['one table']}")


if __name__ == "__main__":
    main()
