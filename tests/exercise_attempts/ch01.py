# ruff: noqa: E501  (answer cells kept verbatim as data)
"""Chapter 01 attempts: each src replaces the whole answer cell (see tests/test_exercise_attempts.py)."""

ATTEMPTS = {
    "q1_attention": {
        "shortcuts": [
            "import torch.nn.functional as F\ndef attention(q, k, v):\n    return F.scaled_dot_product_attention(q, k, v)\n",
            "from torch.nn.functional import scaled_dot_product_attention as s\n"
            "def attention(q, k, v):\n    return s(q, k, v)\n",
            "from kvlab.lab import attention_math\n"
            "def attention(q, k, v):\n    return attention_math.scaled_dot_product_attention(q, k, v)\n",
        ],
        "wrong": [
            # no 1/sqrt(d)
            "def attention(q, k, v):\n    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v\n",
            # divides by d instead of sqrt(d)
            "def attention(q, k, v):\n    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1], dim=-1) @ v\n",
            # softmax over the queries
            "def attention(q, k, v):\n"
            "    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-2) @ v\n",
            # only works for 2-D inputs (k.T)
            "def attention(q, k, v):\n    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v\n",
        ],
    },
    "q2_causal_mask": {
        "shortcuts": [
            "def causal_mask(tq, tk):\n    return torch.tril(torch.ones(tq, tk, dtype=torch.bool), diagonal=tk - tq)\n",
            "def causal_mask(tq, tk):\n    return torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)\n",
            "def causal_mask(tq, tk):\n    return ~torch.triu(torch.ones(tq, tk, dtype=torch.bool), diagonal=tk - tq + 1)\n",
            "from kvlab.lab.attention_math import causal_mask as _c\ndef causal_mask(tq, tk):\n    return _c(tq, tk)\n",
        ],
        "wrong": [
            # no query offset: right only when tq == tk
            "def causal_mask(tq, tk):\n    return torch.arange(tk)[None, :] <= torch.arange(tq)[:, None]\n",
            # off by one: a query cannot see itself
            "def causal_mask(tq, tk):\n    return torch.arange(tk)[None, :] < torch.arange(tq)[:, None] + (tk - tq)\n",
            # transposed comparison
            "def causal_mask(tq, tk):\n    return torch.arange(tk)[None, :] >= torch.arange(tq)[:, None] + (tk - tq)\n",
        ],
    },
    "q3_stable_softmax": {
        "shortcuts": [
            "def stable_softmax(x):\n    return torch.softmax(x, dim=-1)\n",
            "def stable_softmax(x):\n    return x.softmax(-1)\n",
            "import torch.nn.functional as F\ndef stable_softmax(x):\n    return F.softmax(x, dim=-1)\n",
            "def stable_softmax(x):\n    return torch.exp(x - torch.logsumexp(x, -1, keepdim=True))\n",
            "def stable_softmax(x):\n    return torch.log_softmax(x, -1).exp()\n",
            "from kvlab.lab.attention_math import stable_softmax as _s\ndef stable_softmax(x):\n    return _s(x)\n",
            "def stable_softmax(x):\n    try:\n        return torch.softmax(x, -1)\n    except Exception:\n        return x\n",
        ],
        "wrong": [
            # the naive formula: overflows
            "def stable_softmax(x):\n    e = torch.exp(x)\n    return e / e.sum(dim=-1, keepdim=True)\n",
            # subtracts the global maximum: rows far below it underflow to 0/0
            "def stable_softmax(x):\n    e = torch.exp(x - x.max())\n    return e / e.sum(dim=-1, keepdim=True)\n",
            # maximum over the wrong axis
            "def stable_softmax(x):\n    e = torch.exp(x - x.amax(dim=0, keepdim=True))\n    return e / e.sum(dim=-1, keepdim=True)\n",
            # forces float32
            "def stable_softmax(x):\n    x = x.float()\n    e = torch.exp(x - x.amax(dim=-1, keepdim=True))\n"
            "    return e / e.sum(dim=-1, keepdim=True)\n",
        ],
    },
    "q4_repeat_kv": {
        "shortcuts": [
            "def repeat_kv(x, group_size):\n    return x.repeat_interleave(group_size, dim=1)\n",
            "def repeat_kv(x, group_size):\n    return torch.repeat_interleave(x, group_size, dim=1)\n",
            "from kvlab.lab import attention_math\ndef repeat_kv(x, group_size):\n    return attention_math.repeat_kv(x, group_size)\n",
        ],
        "wrong": [
            # tiles the heads (h % Hkv) instead of grouping them (h // group_size)
            "def repeat_kv(x, group_size):\n    return x.repeat(1, group_size, 1, 1)\n",
            # repeats along the token axis
            "def repeat_kv(x, group_size):\n    b, h, t, d = x.shape\n"
            "    return x[:, :, :, None].expand(b, h, t, group_size, d).reshape(b, h * group_size, t, d)\n",
            # forgets the batch dimension
            "def repeat_kv(x, group_size):\n    h, t, d = x.shape[1:]\n"
            "    return x[0, :, None].expand(h, group_size, t, d).reshape(1, h * group_size, t, d)\n",
        ],
    },
}
