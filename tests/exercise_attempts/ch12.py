# ruff: noqa: E501  (answer cells kept verbatim as data)
"""Chapter 12 attempts: each src replaces the whole answer cell (see tests/test_exercise_attempts.py)."""

ATTEMPTS = {
    "q1_victim": {
        "shortcuts": [
            "from kvlab.cluster.eviction import PrefixCache\n"
            "def victim(entries, policy):\n    c = PrefixCache(max(1, len(entries)), policy)\n"
            "    c.entries = dict(entries)\n    e = c._pick_victim(set())\n    return None if e is None else e.name\n",
        ],
        "wrong": [
            # ignores the children: may evict a block others continue
            "def victim(entries, policy):\n    if not entries:\n        return None\n"
            "    key = (lambda e: (e.last_use, e.serial)) if policy == 'lru' else (lambda e: (e.uses, e.last_use, e.serial))\n"
            "    return min(entries.values(), key=key).name\n",
            # LFU ties broken by serial, not recency
            "def victim(entries, policy):\n    leaves = [e for e in entries.values() if e.children == 0]\n"
            "    if not leaves:\n        return None\n"
            "    key = (lambda e: (e.last_use, e.serial)) if policy == 'lru' else (lambda e: (e.uses, e.serial))\n"
            "    return min(leaves, key=key).name\n",
            # evicts the most recent
            "def victim(entries, policy):\n    leaves = [e for e in entries.values() if e.children == 0]\n"
            "    if not leaves:\n        return None\n"
            "    key = (lambda e: (-e.last_use, e.serial)) if policy == 'lru' else (lambda e: (e.uses, -e.last_use, e.serial))\n"
            "    return min(leaves, key=key).name\n",
        ],
    },
    "q2_break_even": {
        "shortcuts": [
            "from kvlab.cluster.offload import break_even_tokens as _be\n"
            "from kvlab.cluster.hardware import Link\nfrom kvlab.costs.roofline import Machine\n"
            "def break_even_tokens(weights, hdl, flops_per_s, bytes_per_token, bandwidth, latency=0.0):\n"
            "    m = MODELS['llama-3.1-8b']\n"
            "    for cand in MODELS.values():  # find the model by its numbers, let kvlab answer\n"
            "        if cand.num_heads * cand.head_dim * cand.num_layers == hdl and kv_bytes_per_token(cand) == bytes_per_token:\n"
            "            m = cand\n"
            "    return _be(m, Link('x', bandwidth, latency), Machine('g', flops_per_s, 1.0))\n",
        ],
        "wrong": [
            # the real root, rounded down
            "def break_even_tokens(weights, hdl, flops_per_s, bytes_per_token, bandwidth, latency=0.0):\n"
            "    a = 2 * hdl / flops_per_s\n    b = 2 * (weights + hdl) / flops_per_s - bytes_per_token / bandwidth\n"
            "    return max(1, int((-b + math.sqrt(b * b + 4 * a * latency)) / (2 * a)))\n",
            # forgets the latency
            "def break_even_tokens(weights, hdl, flops_per_s, bytes_per_token, bandwidth, latency=0.0):\n"
            "    a = 2 * hdl / flops_per_s\n    b = 2 * (weights + hdl) / flops_per_s - bytes_per_token / bandwidth\n"
            "    return max(1, math.ceil(-b / a))\n",
        ],
    },
    "q3_prefix_router": {
        "shortcuts": [
            "def prefix_aware_choice(matches, backlogs, new_work, load_bound=1.25):\n"
            "    return choose_replica('prefix_aware', 0, matches, backlogs, 0, new_work, load_bound)\n",
        ],
        "wrong": [
            # no load bound: always the longest match
            "def prefix_aware_choice(matches, backlogs, new_work, load_bound=1.25):\n"
            "    return min(range(len(matches)), key=lambda i: (-matches[i], backlogs[i], i))\n",
            # the bound without the new work
            "def prefix_aware_choice(matches, backlogs, new_work, load_bound=1.25):\n"
            "    cap = load_bound * sum(backlogs) / len(backlogs)\n"
            "    ok = [i for i in range(len(backlogs)) if backlogs[i] <= cap]\n"
            "    return min(ok, key=lambda i: (-matches[i], backlogs[i], i))\n",
            # ties to the larger index
            "def prefix_aware_choice(matches, backlogs, new_work, load_bound=1.25):\n"
            "    cap = load_bound * (sum(backlogs) + new_work) / len(backlogs)\n"
            "    ok = [i for i in range(len(backlogs)) if backlogs[i] <= cap]\n"
            "    return min(ok, key=lambda i: (-matches[i], backlogs[i], -i))\n",
        ],
    },
}
