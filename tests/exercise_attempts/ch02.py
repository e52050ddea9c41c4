# ruff: noqa: E501  (answer cells kept verbatim as data)
"""Chapter 02 attempts: each src replaces the whole answer cell (see tests/test_exercise_attempts.py)."""

_W = """    c = config
    h, d = c.hidden_size, c.head_dim
    weights = c.num_layers * (2 * h * c.num_heads * d + 2 * h * c.num_kv_heads * d + 3 * h * c.intermediate_size)
"""

ATTEMPTS = {
    "q1_step_flops": {
        "shortcuts": [
            "def naive_step_flops(config, n):\n    return flops.step_flops(config, n, 0, use_cache=False).total\n",
            "from kvlab.costs.forward_cost import forward_cost\n"
            "def naive_step_flops(config, n):\n    return forward_cost(config, n).flops\n",
        ],
        "wrong": [
            # forgets lm_head
            "def naive_step_flops(config, n):\n" + _W
            + "    return 2 * weights * n + 4 * c.num_layers * c.num_heads * d * n * (n + 1) // 2\n",
            # attention over the full square (no causal saving)
            "def naive_step_flops(config, n):\n" + _W
            + "    return 2 * weights * n + 4 * c.num_layers * c.num_heads * d * n * n + 2 * h * c.vocab_size\n",
            # MHA weights: ignores the shared KV heads
            "def naive_step_flops(config, n):\n    c = config\n    h, d = c.hidden_size, c.head_dim\n"
            "    weights = c.num_layers * (4 * h * c.num_heads * d + 3 * h * c.intermediate_size)\n"
            "    return 2 * weights * n + 4 * c.num_layers * c.num_heads * d * n * (n + 1) // 2 + 2 * h * c.vocab_size\n",
        ],
    },
    "q2_total_flops": {
        "shortcuts": [
            "def naive_total_flops(config, prompt_len, new_tokens):\n"
            "    return flops.generation_flops(config, prompt_len, new_tokens, use_cache=False).total\n",
            "def naive_total_flops(config, prompt_len, new_tokens):\n"
            "    return sum(flops.forward_flops(config, prompt_len + t).total for t in range(new_tokens))\n",
        ],
        "wrong": [
            # runs the last token too
            "def naive_total_flops(config, prompt_len, new_tokens):\n"
            "    return sum(naive_step_flops(config, prompt_len + t) for t in range(1, new_tokens + 1))\n",
            # one forward over the final length only
            "def naive_total_flops(config, prompt_len, new_tokens):\n"
            "    return new_tokens * naive_step_flops(config, prompt_len + new_tokens - 1) if new_tokens else 0\n",
        ],
    },
    "q3_crossover": {
        "shortcuts": [
            "def attention_crossover(config):\n    n = 1\n"
            "    while flops.attention_flops(config, n) < flops.linear_flops_per_token(config) * n:\n        n += 1\n    return n\n",
        ],
        "wrong": [
            # off by one (n = W / (L Hq D) instead of n + 1)
            "def attention_crossover(config):\n" + _W
            + "    return -(-weights // (c.num_layers * c.num_heads * d))\n",
            # counts KV heads instead of query heads in attention
            "def attention_crossover(config):\n" + _W
            + "    return max(1, -(-weights // (c.num_layers * c.num_kv_heads * d)) - 1)\n",
            # floor instead of ceiling
            "def attention_crossover(config):\n" + _W
            + "    return max(1, weights // (c.num_layers * c.num_heads * d) - 1)\n",
        ],
    },
    "q4_fit": {
        "shortcuts": [
            "def fit_step_time(n, seconds):\n    c, b, a = np.polyfit(n, seconds, 2)\n    return float(a), float(b), float(c)\n",
            "def fit_step_time(n, seconds):\n    n = np.asarray(n, dtype=float)\n"
            "    A = np.stack([np.ones_like(n), n, n * n], axis=1)\n"
            "    a, b, c = np.linalg.lstsq(A, np.asarray(seconds, dtype=float), rcond=None)[0]\n"
            "    return float(a), float(b), float(c)\n",
            "def fit_step_time(n, seconds):\n    f = fit_quadratic(np.asarray(n, float), np.asarray(seconds, float))\n"
            "    return float(f.a), float(f.b), float(f.c)\n",
            "def fit_step_time(n, seconds):\n    n = np.asarray(n, dtype=float)\n"
            "    A = np.stack([np.ones_like(n), n, n * n], axis=1)\n"
            "    a, b, c = np.linalg.pinv(A) @ np.asarray(seconds, dtype=float)\n    return float(a), float(b), float(c)\n",
        ],
        "wrong": [
            # coefficients in numpy's order (c, b, a)
            "def fit_step_time(n, seconds):\n    n, s = np.asarray(n, dtype=float), np.asarray(seconds, dtype=float)\n"
            "    A = np.stack([n * n, n, np.ones_like(n)], axis=1)\n"
            "    return tuple(float(x) for x in np.linalg.solve(A.T @ A, A.T @ s))\n",
            # interpolates three points instead of fitting all of them
            "def fit_step_time(n, seconds):\n    n, s = np.asarray(n, dtype=float), np.asarray(seconds, dtype=float)\n"
            "    A = np.stack([np.ones(3), n[:3], n[:3] ** 2], axis=1)\n"
            "    return tuple(float(x) for x in np.linalg.solve(A, s[:3]))\n",
        ],
    },
}
