# ruff: noqa: E501  (answer cells kept verbatim as data)
"""Chapter 05 attempts: each src replaces the whole answer cell (see tests/test_exercise_attempts.py)."""

ATTEMPTS = {
    "q1_bytes_per_token": {
        "shortcuts": [
            "def bytes_per_token(m, dtype_bytes=2):\n    return kv_bytes_per_token(m, dtype_bytes)\n",
            "def bytes_per_token(m, dtype_bytes=2):\n    return m.num_layers * m.values_per_token_per_layer() * dtype_bytes\n",
            "def bytes_per_token(m, dtype_bytes=2):\n    return kv_cache_bytes(m, 1, 1, dtype_bytes)\n",
        ],
        "wrong": [
            # ignores MLA: counts per-head K and V for every model
            "def bytes_per_token(m, dtype_bytes=2):\n    return m.num_layers * 2 * m.num_kv_heads * m.head_dim * dtype_bytes\n",
            # MLA without the decoupled RoPE key
            "def bytes_per_token(m, dtype_bytes=2):\n"
            "    per = m.kv_lora_rank if m.kv_lora_rank else 2 * m.num_kv_heads * m.head_dim\n"
            "    return m.num_layers * per * dtype_bytes\n",
            # query heads instead of KV heads (MHA for everyone)
            "def bytes_per_token(m, dtype_bytes=2):\n"
            "    per = m.kv_lora_rank + m.qk_rope_head_dim if m.kv_lora_rank else 2 * m.num_heads * m.head_dim\n"
            "    return m.num_layers * per * dtype_bytes\n",
            # MLA latent counted twice (as if K and V)
            "def bytes_per_token(m, dtype_bytes=2):\n"
            "    per = 2 * (m.kv_lora_rank + m.qk_rope_head_dim) if m.kv_lora_rank else 2 * m.num_kv_heads * m.head_dim\n"
            "    return m.num_layers * per * dtype_bytes\n",
        ],
    },
    "q2_cache_bytes": {
        "shortcuts": [
            "def cache_bytes(m, tokens, batch=1, dtype_bytes=2):\n    return kv_cache_bytes(m, tokens, batch, dtype_bytes)\n",
            "def cache_bytes(m, tokens, batch=1, dtype_bytes=2):\n"
            "    full = kv_bytes_per_token(m, dtype_bytes) // m.num_layers\n"
            "    held = (m.num_layers - m.sliding_layers) * tokens + m.sliding_layers * min(tokens, m.sliding_window or tokens)\n"
            "    return full * held * batch\n",
        ],
        "wrong": [
            # the window on every layer
            "def cache_bytes(m, tokens, batch=1, dtype_bytes=2):\n"
            "    t = min(tokens, m.sliding_window) if m.sliding_layers else tokens\n"
            "    return 2 * m.num_kv_heads * m.head_dim * dtype_bytes * m.num_layers * t * batch\n",
            # a windowed layer always holds the whole window
            "def cache_bytes(m, tokens, batch=1, dtype_bytes=2):\n"
            "    per = 2 * m.num_kv_heads * m.head_dim * dtype_bytes\n"
            "    held = (m.num_layers - m.sliding_layers) * tokens + (m.sliding_layers * m.sliding_window if m.sliding_layers else 0)\n"
            "    return per * held * batch\n",
            # forgets the batch
            "def cache_bytes(m, tokens, batch=1, dtype_bytes=2):\n"
            "    per = 2 * m.num_kv_heads * m.head_dim * dtype_bytes\n"
            "    held = (m.num_layers - m.sliding_layers) * tokens\n"
            "    if m.sliding_layers:\n        held += m.sliding_layers * min(tokens, m.sliding_window)\n"
            "    return per * held\n",
        ],
    },
    "q3_sessions": {
        "shortcuts": [
            "from kvlab.costs.memory import KVConfig, max_concurrent_sequences\n"
            "def sessions(gpu_bytes, weight_bytes, per_session_bytes, utilization=0.9):\n"
            "    m = KVConfig('x', num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1, hidden_size=1,\n"
            "                 num_params=1, max_context=1)\n"
            "    return max_concurrent_sequences(m, gpu_bytes, 1, weight_bytes=weight_bytes, utilization=utilization,\n"
            "                                    dtype_bytes=per_session_bytes / 2)\n",
        ],
        "wrong": [
            # rounds instead of flooring
            "def sessions(gpu_bytes, weight_bytes, per_session_bytes, utilization=0.9):\n"
            "    return max(0, round((gpu_bytes * utilization - weight_bytes) / per_session_bytes))\n",
            # applies the utilization to the free memory instead of the whole GPU
            "def sessions(gpu_bytes, weight_bytes, per_session_bytes, utilization=0.9):\n"
            "    return max(0, math.floor((gpu_bytes - weight_bytes) * utilization / per_session_bytes))\n",
        ],
    },
    "q4_decode_floor": {
        "shortcuts": [
            "from kvlab.costs.roofline import linear_intensity\n"
            "def decode_floor_seconds(weight_bytes, bandwidth, steps):\n"
            "    linear_intensity(1, 1, 1)\n    return steps * weight_bytes / bandwidth\n",
        ],
        "wrong": [
            # no check of the bandwidth
            "def decode_floor_seconds(weight_bytes, bandwidth, steps):\n    return steps * weight_bytes / bandwidth\n",
            # bandwidth over bytes
            "def decode_floor_seconds(weight_bytes, bandwidth, steps):\n"
            "    if bandwidth <= 0:\n        raise ValueError('bandwidth')\n    return steps * bandwidth / weight_bytes\n",
        ],
    },
}
