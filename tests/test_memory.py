"""The KV memory calculator against numbers worked out by hand from the published configurations."""
import pytest

from kvlab.costs.memory import (
    MODELS,
    KVConfig,
    kv_bytes_per_token,
    kv_cache_bytes,
    max_concurrent_sequences,
    weight_bytes,
)
from kvlab.model.config import SMOLLM2_135M

REQUIRED = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b",
            "qwen2.5-7b", "deepseek-v3", "gemma-2-9b", "smollm2-135m"]


def test_every_required_model_is_there_with_a_source():
    for name in REQUIRED:
        assert MODELS[name].name == name
        assert len(MODELS[name].source) > 20, name


def test_hand_computed_bytes_per_token():
    assert kv_bytes_per_token(MODELS["llama-2-7b"]) == 32 * 2 * 32 * 128 * 2 == 524_288   # MHA, 0.5 MiB
    assert kv_bytes_per_token(MODELS["llama-2-70b"]) == 80 * 2 * 8 * 128 * 2 == 327_680   # GQA 8
    assert kv_bytes_per_token(MODELS["qwen2.5-7b"]) == 28 * 2 * 4 * 128 * 2
    assert kv_bytes_per_token(MODELS["deepseek-v3"]) == 61 * (512 + 64) * 2 == 70_272     # MLA latent + RoPE
    assert kv_bytes_per_token("smollm2-135m", 4) == 30 * 2 * 3 * 64 * 4
    assert MODELS["deepseek-v3"].attention == "mla" and MODELS["llama-2-7b"].attention == "mha"
    assert MODELS["llama-2-70b"].attention == "gqa"
    assert MODELS["llama-2-7b"].replace(num_kv_heads=1).attention == "mqa"


def test_smollm2_entry_matches_the_model_config():
    m = MODELS["smollm2-135m"]
    assert m.num_params == SMOLLM2_135M.num_parameters()
    assert kv_bytes_per_token(m) == kv_bytes_per_token(SMOLLM2_135M)


def test_sliding_windows_stop_growing():
    mistral, gemma = MODELS["mistral-7b"], MODELS["gemma-2-9b"]
    per_tok = kv_bytes_per_token(mistral)
    assert kv_cache_bytes(mistral, 1000) == 1000 * per_tok
    assert kv_cache_bytes(mistral, 8192) == kv_cache_bytes(mistral, 4096) == 4096 * per_tok
    per_layer = kv_bytes_per_token(gemma) // 42
    assert kv_cache_bytes(gemma, 8192) == per_layer * (21 * 8192 + 21 * 4096)
    assert kv_cache_bytes(gemma, 100, batch=3) == 3 * 100 * kv_bytes_per_token(gemma)


def test_max_concurrent_sequences_by_hand():
    m = MODELS["llama-2-7b"]
    free = 80e9 * 0.9 - 6.74e9 * 2
    assert max_concurrent_sequences(m, 80e9, 4096) == int(free // (4096 * 524_288))
    everything = max_concurrent_sequences(m, 80e9, 4096, weight_bytes=0, utilization=1.0)
    assert everything == int(80e9 // (4096 * 524_288))
    assert max_concurrent_sequences(MODELS["llama-2-70b"], 80e9, 4096) == 0  # 138 GB of weights
    assert weight_bytes(m) == 6.74e9 * 2
    # vLLM's utilization share holds the activation peak too: it comes out of the cache's share
    with_act = max_concurrent_sequences(m, 80e9, 4096, activation_bytes=2e9)
    assert with_act == int((free - 2e9) // (4096 * 524_288)) < max_concurrent_sequences(m, 80e9, 4096)
    with pytest.raises(ValueError, match="activation_bytes"):
        max_concurrent_sequences(m, 80e9, 4096, activation_bytes=-1)


def test_quantized_dtype_delegates_to_quant():
    quant = pytest.importorskip("kvlab.quant")
    m = MODELS["llama-3.1-8b"]
    assert kv_bytes_per_token(m, kv_cache_dtype="auto") == kv_bytes_per_token(m)
    assert kv_bytes_per_token(m, kv_cache_dtype="int8") == quant.bytes_per_token(m, "int8", model_dtype=2)
    assert kv_bytes_per_token(m, kv_cache_dtype="int8") > kv_bytes_per_token(m, 1)  # scales cost bytes
    with pytest.raises(ValueError, match="MLA"):
        kv_bytes_per_token(MODELS["deepseek-v3"], kv_cache_dtype="fp8")


def test_bad_input_raises():
    with pytest.raises(ValueError, match="dtype_bytes"):
        kv_bytes_per_token(MODELS["llama-2-7b"], 0)
    with pytest.raises(ValueError, match="unknown model"):
        kv_bytes_per_token("gpt-5")
    with pytest.raises(ValueError, match="tokens"):
        kv_cache_bytes(MODELS["llama-2-7b"], -1)
    with pytest.raises(ValueError, match="utilization"):
        max_concurrent_sequences(MODELS["llama-2-7b"], 80e9, 10, utilization=1.5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        KVConfig("x", 2, 6, 4, 64, 384, 1e6, 128)
    with pytest.raises(ValueError, match="sliding_window"):
        KVConfig("x", 2, 4, 4, 64, 256, 1e6, 128, sliding_layers=1)


def test_published_shapes_are_self_consistent():
    for name, m in MODELS.items():
        assert m.vocab_size > 0 and m.num_params > m.vocab_size * m.hidden_size, name
        if name != "gemma-2-9b" and m.attention != "mla":   # Gemma 2: 16 x 256 = 4096 > 3584
            assert m.num_heads * m.head_dim == m.hidden_size, name
    assert MODELS["gemma-2-9b"].tie_embeddings and MODELS["smollm2-135m"].tie_embeddings
    assert not MODELS["llama-3.1-8b"].tie_embeddings
    assert MODELS["deepseek-v3"].active_params == 37e9


def test_llama_config_conversion_keeps_vocab_and_tying():
    from kvlab.costs.memory import as_kv_config
    kv = as_kv_config(SMOLLM2_135M)
    assert kv.vocab_size == SMOLLM2_135M.vocab_size and kv.tie_embeddings
    assert kv.num_params == SMOLLM2_135M.num_parameters()
