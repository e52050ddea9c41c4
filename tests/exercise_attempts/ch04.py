# ruff: noqa: E501  (answer cells kept verbatim as data)
"""Chapter 04 attempts: each src replaces the whole answer cell (see tests/test_exercise_attempts.py)."""

_HEAD = """def forward_flops(cfg, new_tokens, context=0):
    h, d = cfg.hidden_size, cfg.head_dim
    per_layer = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2 + 3 * h * cfg.intermediate_size
    head = cfg.vocab_size * h
"""

ATTEMPTS = {
    "q1_forward_flops": {
        "shortcuts": [
            "def forward_flops(cfg, new_tokens, context=0):\n    return forward_cost(cfg, new_tokens, context).flops\n",
            "from kvlab.costs.flops import forward_flops as _ff\n"
            "def forward_flops(cfg, new_tokens, context=0):\n    return _ff(cfg, new_tokens, context).total\n",
            "def forward_flops(cfg, new_tokens, context=0):\n"
            "    head = cfg.vocab_size * cfg.hidden_size\n"
            "    body = cfg.num_parameters() - head - cfg.hidden_size * (2 * cfg.num_layers + 1)\n"
            "    keys = sum(context + i + 1 for i in range(new_tokens))\n"
            "    return 2 * body * new_tokens + 2 * head + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys\n",
        ],
        "wrong": [
            # the causal mask forgotten: every new token sees all context + new_tokens keys
            _HEAD + "    keys = new_tokens * (context + new_tokens)\n"
            "    return 2 * cfg.num_layers * per_layer * new_tokens + 2 * head + 4 * cfg.num_layers * cfg.num_heads * d * keys\n",
            # logits for every position
            _HEAD + "    keys = sum(context + i + 1 for i in range(new_tokens))\n"
            "    return 2 * cfg.num_layers * per_layer * new_tokens + 2 * head * new_tokens + 4 * cfg.num_layers * cfg.num_heads * d * keys\n",
            # multiply-adds counted as 1 FLOP
            _HEAD + "    keys = sum(context + i + 1 for i in range(new_tokens))\n"
            "    return cfg.num_layers * per_layer * new_tokens + head + 2 * cfg.num_layers * cfg.num_heads * d * keys\n",
        ],
    },
    "q2_attainable": {
        "shortcuts": [
            "def attainable(peak_flops, bandwidth, intensity):\n"
            "    return Machine('m', peak_flops, bandwidth).attainable(intensity)\n",
        ],
        "wrong": [
            # max instead of min
            "def attainable(peak_flops, bandwidth, intensity):\n    if intensity <= 0:\n        raise ValueError('intensity')\n"
            "    return max(peak_flops, intensity * bandwidth)\n",
            # no check of the intensity
            "def attainable(peak_flops, bandwidth, intensity):\n    return min(peak_flops, intensity * bandwidth)\n",
            # divides by the intensity
            "def attainable(peak_flops, bandwidth, intensity):\n    if intensity <= 0:\n        raise ValueError('intensity')\n"
            "    return min(peak_flops, bandwidth / intensity)\n",
        ],
    },
    "q3_critical_batch": {
        "shortcuts": [
            "from kvlab.costs.forward_cost import critical_batch as _cb\n"
            "def critical_batch(machine, weight_dtype_bytes=2):\n    return _cb(machine, weight_dtype_bytes)\n",
        ],
        "wrong": [
            # rounds down
            "def critical_batch(machine, weight_dtype_bytes=2):\n"
            "    return max(1, int(machine.ridge * weight_dtype_bytes / 2))\n",
            # ignores the weight width
            "def critical_batch(machine, weight_dtype_bytes=2):\n    return max(1, math.ceil(machine.ridge / 2))\n",
            # intensity B / bytes (forgets the 2 FLOPs of a multiply-add)
            "def critical_batch(machine, weight_dtype_bytes=2):\n"
            "    return max(1, math.ceil(machine.ridge * weight_dtype_bytes))\n",
        ],
    },
}
