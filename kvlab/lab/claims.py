"""Published statements about KV-cache memory and inference time, checked with the calculator.

Each `Claim` keeps the number the statement gives, the number `kvlab.costs.memory` and
`kvlab.costs.forward_cost` compute under the stated assumptions, and a verdict with its reason. The nine
statements are the ones chapter 05 checks; `check_all()` recomputes every verdict, so a change in
the calculator or in `MODELS` shows up in the table (and in `tests/test_claims.py`).

Conventions: GB = 10^9 bytes, "128k" = 128,000 tokens, fp16 = 2 bytes per value and per weight.
A stated number "holds" when it is within `TOLERANCE` (10 %) of the computed one, since the
statements say "about"; a bound ("more than twice") holds when the computed number satisfies it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from kvlab.costs.forward_cost import forward_cost
from kvlab.costs.memory import MODELS, kv_bytes_per_token, kv_cache_bytes, max_concurrent_sequences, weight_bytes
from kvlab.costs.roofline import GPUS

TOLERANCE = 0.10
GB = 1e9
BLOCK_SIZE = 16          # tokens per block of the paged cache (vLLM's default)

# Where each statement comes from. Issue 3 of this project listed the nine as statements that
# circulate; it named no publication. Where a published form was found it is cited; where none was,
# the entry says so rather than guess.
_FROM_ISSUE = "kvlab issue 3 (chapter 05's list of circulating statements; no publication named)"
SOURCES = {
    1: f"{_FROM_ISSUE}; arithmetic of the Llama 2 70B shape (Touvron et al., 2023, Table 1) with MHA",
    2: f"{_FROM_ISSUE}; GQA itself: Ainslie et al., 2023, 'GQA: Training Generalized Multi-Query "
       "Transformer Models from Multi-Head Checkpoints'",
    3: f"{_FROM_ISSUE}; not traced to a publication",
    4: f"{_FROM_ISSUE}; the same 7B / 32-layer / 4,096-token example ('~2 GB') is worked in NVIDIA's "
       "technical blog 'Mastering LLM Techniques: Inference Optimization' (2023)",
    5: f"{_FROM_ISSUE}; not traced to a publication (the paging gain it cites is the idea of Kwon et "
       "al., 2023, 'Efficient Memory Management for Large Language Model Serving with PagedAttention')",
    6: f"{_FROM_ISSUE}; not traced to a publication",
    7: f"{_FROM_ISSUE}; the formula is given in this form in NVIDIA's technical blog 'Mastering LLM "
       "Techniques: Inference Optimization' (2023), which states it for multi-head attention",
    8: f"{_FROM_ISSUE}; vLLM's and TensorRT's FP8 KV-cache documentation state the same halving",
    9: f"{_FROM_ISSUE}; not traced to a publication",
}


def tensor_parallel(gpu: str, n: int):
    """`n` GPUs of one kind as one roofline machine: n x the FLOP/s, bandwidth and memory (a floor
    for tensor parallelism: every GPU reads its 1/n of the weights; communication not counted)."""
    g = GPUS[gpu]
    return replace(g, name=f"{n}x {g.name}", peak_flops=g.peak_flops * n, bandwidth=g.bandwidth * n,
                   memory_bytes=g.memory_bytes * n)


def decode_floor(m, machine, prompt: int = 2000, new: int = 500, weight_dtype_bytes: float = 2) -> float:
    """Roofline floor of `new` batch-1 decode steps after a `prompt`-token prefill, in seconds."""
    return sum(forward_cost(m, 1, prompt + t, weight_dtype_bytes=weight_dtype_bytes).floor_seconds(machine)
               for t in range(new))


@dataclass(frozen=True)
class Claim:
    number: int
    statement: str
    stated: float            # the figure the statement gives (its unit in `unit`)
    computed: float          # what the calculator gives under `assumptions`
    unit: str
    holds: bool
    reason: str
    assumptions: str
    source: str = ""         # where the statement comes from
    cases: str = ""          # the verdict by case, when one word would mislead

    def __post_init__(self):
        if not self.source:
            object.__setattr__(self, "source", SOURCES.get(self.number, ""))

    @property
    def verdict(self) -> str:
        return self.cases or ("holds" if self.holds else "does not hold")


def close(stated: float, computed: float, rel: float = TOLERANCE) -> bool:
    """True when `stated` is within `rel` of `computed` (relative to the computed number)."""
    return abs(stated - computed) <= rel * abs(computed)


def mha_70b():
    """The 70B-class model of claim 1: Llama-2-70B's shape with full multi-head attention."""
    return MODELS["llama-2-70b"].replace(name="70b-mha", num_kv_heads=64)


def claim_1() -> Claim:
    m = mha_70b()
    per_token = kv_bytes_per_token(m)
    at_128k = kv_cache_bytes(m, 128_000)
    ratio = at_128k / weight_bytes(m)
    ok = close(2.6e6, per_token) and close(335 * GB, at_128k) and ratio > 2
    return Claim(1, "A 70B-class model with full MHA (80 layers, 64 heads, head dim 128, fp16) needs "
                    "about 2.6 MB of KV cache per token, so about 335 GB at 128k context, more than "
                    "twice its fp16 weights.",
                 335 * GB, at_128k, "bytes", ok,
                 f"80 x 2 x 64 x 128 x 2 = {per_token:,} B = {per_token / 1e6:.2f} MB per token; x 128,000 = "
                 f"{at_128k / GB:.1f} GB ({kv_cache_bytes(m, 131072) / GB:.1f} GB at 131,072 tokens); "
                 f"{ratio:.2f}x the {weight_bytes(m) / GB:.0f} GB of fp16 weights",
                 "Llama-2-70B's shape with 64 KV heads; 69.0e9 weights; 128k = 128,000 tokens")


def claim_2() -> Claim:
    mha, gqa = mha_70b(), MODELS["llama-2-70b"]
    ratio = kv_bytes_per_token(mha) / kv_bytes_per_token(gqa)
    total = (kv_cache_bytes(mha, 128_000) + weight_bytes(mha)) / (kv_cache_bytes(gqa, 128_000)
                                                                    + weight_bytes(gqa))
    return Claim(2, "Grouped-query attention with 8 KV heads instead of 64 cuts that cache 8x.",
                 8, ratio, "x", close(8, ratio),
                 f"the cache is proportional to the KV heads: 64 / 8 = {ratio:.0f}x "
                 f"({kv_bytes_per_token(gqa):,} B per token); the whole memory at 128k "
                 f"(cache + weights) falls only {total:.1f}x",
                 "same layers, head dim and dtype; only num_kv_heads changes")


def claim_3() -> Claim:
    m = MODELS["llama-2-13b"]
    b = kv_cache_bytes(m, 4096, batch=8)
    return Claim(3, "LLaMA-2 13B at batch size 8 with a 4K context needs about 26 GB of KV cache.",
                 26 * GB, b, "bytes", close(26 * GB, b),
                 f"40 x 2 x 40 x 128 x 2 = {kv_bytes_per_token(m):,} B per token x 4,096 x 8 = "
                 f"{b / GB:.1f} GB ({b / 2**30:.1f} GiB)",
                 "4K = 4,096 tokens, fp16, MHA (LLaMA-2-13B has 40 KV heads)")


def claim_4() -> Claim:
    m = MODELS["llama-2-7b"]
    b = kv_cache_bytes(m, 4096)
    gqa = {k: kv_cache_bytes(MODELS[k], 4096) for k in ("mistral-7b", "llama-3.1-8b", "qwen2.5-7b")}
    others = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in gqa.items())
    return Claim(4, "A 7B model with 32 layers at 4096 tokens needs \"several GB\" of KV cache per "
                    "request.",
                 2 * GB, b, "bytes", b >= 2 * GB,
                 f"with full MHA (LLaMA-2-7B): 32 x 2 x 32 x 128 x 2 x 4,096 = {b / GB:.2f} GB "
                 f"(exactly 2 GiB), the low end of 'several'; with GQA the same size of model needs "
                 f"far less ({others})",
                 "'several GB' read as at least 2 GB; fp16; one sequence")


def claim_5(gpu_bytes: float = 80 * GB, utilization: float = 0.9) -> Claim:
    m = MODELS["llama-2-70b"]
    used = 2000 + 500
    per_seq = kv_cache_bytes(m, used)
    ignoring_weights = math.floor(gpu_bytes / per_seq)
    paged_tokens = math.ceil(used / BLOCK_SIZE) * BLOCK_SIZE
    gain_max = 4096 / paged_tokens - 1                  # contiguous reserving max_context = 4096
    gain_exact = used / paged_tokens - 1                # contiguous reserving exactly 2,500
    implied = used * 1.37                               # what a +37 % gain needs reserved
    mha = kv_cache_bytes(mha_70b(), used)
    two = max_concurrent_sequences(m, 2 * gpu_bytes, used, utilization=utilization)
    two_max = max_concurrent_sequences(m, 2 * gpu_bytes, 4096, utilization=utilization)
    two_paged = max_concurrent_sequences(m, 2 * gpu_bytes, paged_tokens, utilization=utilization)
    return Claim(5, "A 70B model serving a 2,000-token prompt plus a 500-token answer holds 2.1 GB of "
                    "cache per session, so an 80 GB GPU serves about 38 concurrent sessions; paged "
                    "memory raises that to 52 (+37 %).",
                 2.1 * GB, per_seq, "bytes per session", False,
                 f"Llama-2-70B (GQA, 8 KV heads) holds {per_seq / GB:.2f} GB per 2,500-token session "
                 f"(a full-MHA 70B: {mha / GB:.2f} GB), not 2.1; 38 = 80 / 2.1 ignores the weights, "
                 f"and the {weight_bytes(m) / GB:.0f} GB of fp16 weights do not fit in "
                 f"{gpu_bytes * utilization / GB:.0f} usable GB at all (0 sessions; with the weights "
                 f"ignored, {ignoring_weights}). On two such GPUs {two} sessions fit "
                 f"({two_max} reserving 4,096 tokens each, {two_paged} paged). Paging with "
                 f"{BLOCK_SIZE}-token blocks keeps "
                 f"{paged_tokens} slots per session: against a contiguous cache reserving the "
                 f"model's 4,096 tokens it fits {gain_max:+.0%} more sessions, against one reserving "
                 f"exactly 2,500 it fits {gain_exact:+.1%}; +37 % assumes ~{implied:,.0f} slots "
                 f"reserved per session, which the statement does not say",
                 f"Llama-2-70B, fp16 weights and cache, {gpu_bytes / GB:.0f} GB GPU, "
                 f"{utilization:.0%} of it usable; paging wastes < 1 block per sequence "
                 f"(Kwon et al., 2023)")


def claim_6(gpu: str = "H100 SXM") -> Claim:
    m, g = MODELS["llama-2-70b"], GPUS[gpu]
    prefill = forward_cost(m, 2000).floor_seconds(g)
    decode = sum(forward_cost(m, 1, 2000 + t).floor_seconds(g) for t in range(500))
    naive = sum(forward_cost(m, 2000 + t, use_cache=False).floor_seconds(g) for t in range(500))
    h200 = GPUS["H200"]
    decode_h200 = sum(forward_cost(m, 1, 2000 + t).floor_seconds(h200) for t in range(500))
    per_step = forward_cost(m, 1, 2000)
    need_bw = per_step.bytes / (1.2 / 500)
    node = {(k, wb): decode_floor(m, tensor_parallel(k, 8), weight_dtype_bytes=wb)
            for k in (gpu, "H200") for wb in (2, 1)}
    reachable = [f"8x {k} with {'fp8' if wb == 1 else 'fp16'} weights" for (k, wb), t in node.items() if t <= 1.2]
    return Claim(6, "The same 70B request takes 12.4 s without a cache and 2.8 s with one (1.6 s "
                    "prefill, then 500 tokens in 1.2 s) on one GPU.",
                 1.2, decode, "s for 500 decode steps", False,
                 f"every decode step reads the {per_step.weight_bytes / GB:.1f} GB of weights (all "
                 f"but the input embedding table, a lookup): at "
                 f"{g.bandwidth / 1e12:.2f} TB/s that is >= {per_step.floor_seconds(g) * 1e3:.0f} ms "
                 f"per token, so 500 tokens take >= {decode:.1f} s ({decode_h200:.1f} s on an H200), "
                 f"not 1.2 s, which would need {need_bw / 1e12:.0f} TB/s. The prefill floor is "
                 f"{prefill:.2f} s (1.6 s is plausible), so the cached request takes >= "
                 f"{prefill + decode:.1f} s, not 2.8; without a cache each step recomputes ~2,000+ "
                 f"tokens: >= {naive:.0f} s, not 12.4. And {weight_bytes(m) / GB:.0f} GB of fp16 weights do "
                 f"not fit one {g.memory_bytes / GB:.0f} GB {gpu}. On 8 GPUs (tensor parallel, "
                 f"communication not counted) the 500 decode steps take >= "
                 f"{node[gpu, 2]:.2f} s on 8x {gpu} with fp16 weights, {node[gpu, 1]:.2f} s with fp8 "
                 f"weights, {node['H200', 2]:.2f} s and {node['H200', 1]:.2f} s on 8x H200: 1.2 s is "
                 f"within reach only on " + (" or ".join(reachable) or "none of these"),
                 f"Llama-2-70B, fp16, batch 1, {gpu} datasheet ({g.peak_flops / 1e12:.0f} TFLOP/s "
                 f"dense BF16, {g.bandwidth / 1e12:.2f} TB/s); roofline floors (no kernel is faster)",
                 SOURCES[6],
                 "does not hold on one GPU; the decode time is reachable only on "
                 + (" or ".join(reachable) or "none of the 8-GPU nodes checked"))


def claim_7() -> Claim:
    def formula(m):
        return m.num_layers * 1 * 2 * m.hidden_size * 2
    rows = {k: formula(MODELS[k]) / kv_bytes_per_token(MODELS[k])
            for k in ("llama-2-7b", "llama-3.1-70b", "gemma-2-9b", "deepseek-v3")}
    m = MODELS["llama-3.1-70b"]
    return Claim(7, "Total cache size = layers x sequence length x 2 x hidden size x bytes per value.",
                 formula(m), kv_bytes_per_token(m), "bytes per token (Llama-3.1-70B)", False,
                 "it is right only when kv_heads x head_dim = hidden_size (full MHA, e.g. LLaMA-2-7B); "
                 "the general formula is layers x length x batch x 2 x kv_heads x head_dim x bytes "
                 "(MLA: layers x length x (latent + RoPE dims) x bytes). Formula / true: "
                 + ", ".join(f"{k} {r:.2f}x" for k, r in rows.items()),
                 "per token, batch 1, fp16; Gemma 2's windows left out (they only widen the gap)",
                 SOURCES[7],
                 "holds for full multi-head attention; overcounts GQA, MQA and MLA models")


def claim_8() -> Claim:
    m = MODELS["llama-3.1-8b"]
    fp16 = kv_bytes_per_token(m, 2)
    try:
        fp8 = kv_bytes_per_token(m, kv_cache_dtype="fp8")
        how = "kvlab.quant's fp8 format (scales per layer, not per token)"
    except ImportError:  # pragma: no cover - kvlab.quant is part of the package
        fp8, how = kv_bytes_per_token(m, 1), "1 byte per value"
    saving = 1 - fp8 / fp16
    return Claim(8, "Storing K and V in FP8 saves about 50 % of KV memory.",
                 0.50, saving, "fraction saved", close(0.50, saving),
                 f"1 byte instead of 2 per value: {fp16:,} -> {fp8:,.0f} B per token, "
                 f"{saving:.1%} saved against fp16/bf16 ({1 - fp8 / (2 * fp16):.0%} against fp32)",
                 f"baseline a 16-bit cache; Llama-3.1-8B; {how}")


def claim_9(gpu: str = "H100 SXM", first_context: int = 100) -> Claim:
    m, g = MODELS["llama-3.1-8b"], GPUS[gpu]
    early, late = forward_cost(m, first_context, use_cache=False), forward_cost(m, 4000, use_cache=False)
    flop_ratio = late.flops / early.flops
    time_ratio = late.floor_seconds(g) / early.floor_seconds(g)
    cached = forward_cost(m, 1, 4000).floor_seconds(g) / forward_cost(m, 1, first_context).floor_seconds(g)

    def ratio_at(batch):
        return (forward_cost(m, 4000, batch=batch, use_cache=False).floor_seconds(g)
                / forward_cost(m, first_context, batch=batch, use_cache=False).floor_seconds(g))
    by_batch = {b: ratio_at(b) for b in (1, 2, 3, 4, 8, 64)}
    from_batch = next((b for b, r in by_batch.items() if close(40, r)), None)
    return Claim(9, "Without a cache, a 4,000-token conversation takes 40x longer per generated token "
                    "than the first response.",
                 40, time_ratio, "x (time per token)", close(40, time_ratio),
                 f"the FLOPs per token grow {flop_ratio:.1f}x, but a {first_context}-token step is "
                 f"still bound by reading the weights (intensity {early.intensity:.0f} < ridge "
                 f"{g.ridge:.0f}), so on an {gpu} the roofline time per token grows "
                 f"{time_ratio:.1f}x; time follows the FLOPs only on a machine whose ridge lies "
                 f"below {first_context} FLOP/byte (a CPU). Batching lifts the short step's "
                 f"intensity: by batch size the time ratio is "
                 + ", ".join(f"{b}: {r:.1f}x" for b, r in by_batch.items())
                 + f". With a cache it grows {cached:.2f}x",
                 f"the first response is generated at a {first_context}-token context (the reading "
                 f"that makes 4,000 / {first_context} = 40); Llama-3.1-8B, fp16, batch 1, roofline "
                 f"floors on the {gpu} datasheet",
                 SOURCES[9],
                 (f"holds from batch {from_batch} on the {gpu} (in FLOPs always: {flop_ratio:.1f}x); "
                  f"not at batch 1 ({time_ratio:.1f}x)") if from_batch else "does not hold")


def check_all() -> list[Claim]:
    """All nine claims, recomputed."""
    return [claim_1(), claim_2(), claim_3(), claim_4(), claim_5(), claim_6(), claim_7(), claim_8(),
            claim_9()]


def as_rows(claims: list[Claim] | None = None) -> list[dict]:
    """The claims as plain dicts (for a pandas DataFrame or a markdown table)."""
    return [{"#": c.number, "statement": c.statement, "stated": c.stated, "computed": c.computed,
             "unit": c.unit, "verdict": c.verdict, "reason": c.reason, "assumptions": c.assumptions,
             "source": c.source}
            for c in (check_all() if claims is None else claims)]
