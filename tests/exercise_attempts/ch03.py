# ruff: noqa: E501  (answer cells kept verbatim as data)
"""Chapter 03 attempts: each src replaces the whole answer cell (see tests/test_exercise_attempts.py)."""

_PREALLOC_HEAD = """class PreallocKVCache:
    def __init__(self, num_layers, num_kv_heads, head_dim, max_len, dtype=torch.float32):
        shape = (1, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.max_len, self.length = max_len, 0

    @property
    def position_offset(self):
        return self.length

    def advance(self, num_tokens):
        self.length += num_tokens
"""

ATTEMPTS = {
    "q1_decode_loop": {
        "shortcuts": [
            "def cached_greedy(model, prompt_ids, n):\n    return kvlab.generate(model, prompt_ids, n)\n",
            "from kvlab.generate import iter_generate\n"
            "def cached_greedy(model, prompt_ids, n):\n    return [s.token for s in iter_generate(model, prompt_ids, n)]\n",
            "def cached_greedy(model, prompt_ids, n):\n    return tiny_cached_generate(model, prompt_ids, n)\n",
        ],
        "wrong": [
            # no cache: the whole sequence again at every step
            "def cached_greedy(model, prompt_ids, n):\n    ids = list(prompt_ids)\n    with torch.inference_mode():\n"
            "        for _ in range(n):\n            ids.append(int(model(torch.tensor([ids]), last_only=True)[0, -1].argmax()))\n"
            "    return ids[len(prompt_ids):]\n",
            # feeds the whole sequence into the cache at every step (wrong positions, duplicated keys)
            "def cached_greedy(model, prompt_ids, n):\n"
            "    cache = ContiguousKVCache.for_model(model, 1, (len(prompt_ids) + n) * (n + 1))\n"
            "    ids = list(prompt_ids)\n    with torch.inference_mode():\n        for _ in range(n):\n"
            "            ids.append(int(model(torch.tensor([ids]), cache=cache, last_only=True)[0, -1].argmax()))\n"
            "    return ids[len(prompt_ids):]\n",
            # returns the prompt too
            "def cached_greedy(model, prompt_ids, n):\n    cache = ContiguousKVCache.for_model(model, 1, len(prompt_ids) + n)\n"
            "    new, out = torch.tensor([list(prompt_ids)]), list(prompt_ids)\n    with torch.inference_mode():\n"
            "        for _ in range(n):\n            out.append(int(model(new, cache=cache, last_only=True)[0, -1].argmax()))\n"
            "            new = torch.tensor([[out[-1]]])\n    return out\n",
        ],
    },
    "q2_prealloc_cache": {
        "shortcuts": [
            "class PreallocKVCache(ContiguousKVCache):\n"
            "    def __init__(self, num_layers, num_kv_heads, head_dim, max_len, dtype=torch.float32):\n"
            "        super().__init__(num_layers, 1, num_kv_heads, head_dim, max_len, dtype=dtype)\n",
            # grows by concatenation (what the exercise is not)
            _PREALLOC_HEAD + """
    def attend(self, layer, q, k, v):
        old_k = self.k[layer][:, :, :self.length]
        old_v = self.v[layer][:, :, :self.length]
        keys = torch.cat([old_k, k.transpose(1, 2)], dim=2)
        values = torch.cat([old_v, v.transpose(1, 2)], dim=2)
        self.k[layer][:, :, :keys.shape[2]] = keys
        self.v[layer][:, :, :values.shape[2]] = values
        return causal_attention(q, keys.transpose(1, 2), values.transpose(1, 2), q_offset=self.length)
""",
        ],
        "wrong": [
            # forgets the query offset: a new token sees only key 0
            _PREALLOC_HEAD + """
    def attend(self, layer, q, k, v):
        s, e = self.length, self.length + k.shape[1]
        if e > self.max_len:
            raise ValueError("max_len")
        self.k[layer][:, :, s:e] = k.transpose(1, 2)
        self.v[layer][:, :, s:e] = v.transpose(1, 2)
        return causal_attention(q, self.k[layer][:, :, :e].transpose(1, 2), self.v[layer][:, :, :e].transpose(1, 2))
""",
            # no check for a full cache (slicing past max_len fails with another error)
            _PREALLOC_HEAD + """
    def attend(self, layer, q, k, v):
        s, e = self.length, self.length + k.shape[1]
        self.k[layer][:, :, s:e] = k.transpose(1, 2)
        self.v[layer][:, :, s:e] = v.transpose(1, 2)
        return causal_attention(q, self.k[layer][:, :, :e].transpose(1, 2), self.v[layer][:, :, :e].transpose(1, 2), q_offset=s)
""",
            # advances inside attend (once per layer instead of once per forward)
            _PREALLOC_HEAD.replace("        self.length += num_tokens\n", "        pass\n") + """
    def attend(self, layer, q, k, v):
        s, e = self.length, self.length + k.shape[1]
        if e > self.max_len:
            raise ValueError("max_len")
        self.k[layer][:, :, s:e] = k.transpose(1, 2)
        self.v[layer][:, :, s:e] = v.transpose(1, 2)
        self.length = e
        return causal_attention(q, self.k[layer][:, :, :e].transpose(1, 2), self.v[layer][:, :, :e].transpose(1, 2), q_offset=s)
""",
        ],
    },
    "q3_cells_computed": {
        "shortcuts": [
            "def kv_cells_computed(num_layers, prompt_len, new_tokens, use_cache):\n"
            "    if not new_tokens:\n        return 0\n"
            "    return watch.frames('cached' if use_cache else 'naive', num_layers, prompt_len, new_tokens)[-1].computed_total\n",
        ],
        "wrong": [
            # counts the last token as run
            "def kv_cells_computed(num_layers, prompt_len, new_tokens, use_cache):\n"
            "    if use_cache:\n        return num_layers * (prompt_len + new_tokens)\n"
            "    return num_layers * sum(prompt_len + t for t in range(new_tokens + 1))\n",
            # forgets the layers
            "def kv_cells_computed(num_layers, prompt_len, new_tokens, use_cache):\n"
            "    if new_tokens == 0:\n        return 0\n    if use_cache:\n        return prompt_len + new_tokens - 1\n"
            "    return sum(prompt_len + t for t in range(new_tokens))\n",
        ],
    },
    "q4_concat_bytes": {
        "shortcuts": [
            """def concat_bytes_copied(bytes_per_token, prompt_len, new_tokens):
    c = MeteredConcat(1)
    d = bytes_per_token // 8
    x = torch.zeros(1, prompt_len, 1, d)
    c.attend(0, x, x, x)
    c.advance(prompt_len)
    for _ in range(new_tokens - 1):
        t = torch.zeros(1, 1, 1, d)
        c.attend(0, t, t, t)
        c.advance(1)
    return c.copied
""",
        ],
        "wrong": [
            # counts every decode step including the last token's
            "def concat_bytes_copied(bytes_per_token, prompt_len, new_tokens):\n"
            "    return bytes_per_token * sum(prompt_len + t - 1 for t in range(1, new_tokens + 1))\n",
            # counts the prefill as copied
            "def concat_bytes_copied(bytes_per_token, prompt_len, new_tokens):\n"
            "    return bytes_per_token * sum(prompt_len + t for t in range(new_tokens))\n",
        ],
    },
}
