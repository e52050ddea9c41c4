# ruff: noqa: E501  (answer cells kept verbatim as data)
"""Chapter 00 attempts: each src replaces the whole answer cell (see tests/test_exercise_attempts.py)."""

ATTEMPTS = {
    "q1_block_parameters": {
        "shortcuts": [
            "from kvlab.model.llama import Block\n"
            "def block_parameters(cfg):\n    return sum(p.numel() for p in Block(cfg, 0).parameters())\n",
            "def block_parameters(cfg):\n"
            "    emb = cfg.vocab_size * cfg.hidden_size\n"
            "    return (cfg.num_parameters() - emb - cfg.hidden_size) // cfg.num_layers\n",
        ],
        "wrong": [
            # MHA: ignores the shared K/V heads
            "def block_parameters(cfg):\n    h, d = cfg.hidden_size, cfg.head_dim\n"
            "    return 4 * h * cfg.num_heads * d + 3 * h * cfg.intermediate_size + 2 * h\n",
            # forgets the norms
            "def block_parameters(cfg):\n    h, d = cfg.hidden_size, cfg.head_dim\n"
            "    return 2 * h * cfg.num_heads * d + 2 * h * cfg.num_kv_heads * d + 3 * h * cfg.intermediate_size\n",
            # a two-matrix MLP (no SwiGLU gate)
            "def block_parameters(cfg):\n    h, d = cfg.hidden_size, cfg.head_dim\n"
            "    return 2 * h * cfg.num_heads * d + 2 * h * cfg.num_kv_heads * d + 2 * h * cfg.intermediate_size + 2 * h\n",
        ],
    },
}
