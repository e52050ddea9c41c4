"""kvlab.model.hf_export: a kvlab Llama written as a Hugging Face folder reads back, in
transformers' LlamaForCausalLM and in kvlab's own loader, as the same model (same logits)."""
import json
import warnings

import pytest
import torch
from helpers import random_llama

import kvlab
from kvlab.model.config import LlamaConfig
from kvlab.model.hf_export import export_hf, hf_config
from kvlab.model.llama import Llama


def _hf_model(folder, dtype=torch.float32):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _random_llama(tie: bool, seed: int = 0) -> Llama:
    return random_llama(seed, tie=tie, num_layers=2, max_position_embeddings=128, bos_token_id=1,
                        eos_token_id=2)


@pytest.mark.parametrize("tie", [True, False])
@torch.inference_mode()
def test_export_round_trip_random_weights(tmp_path, tie):
    model = _random_llama(tie)
    folder = export_hf(tmp_path / "m", model=model, dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    want = model(ids)
    hf = _hf_model(folder, dtype=torch.float64)
    assert hf.config.tie_word_embeddings == tie
    # float64 weights; kvlab's RMSNorm computes in float32, so agreement is to float32 precision
    torch.testing.assert_close(hf(ids).logits.float(), want, rtol=1e-5, atol=1e-5)
    back, _ = kvlab.load_model(folder, dtype=torch.float64, tokenizer=False)
    assert back.config == model.config
    torch.testing.assert_close(back(ids), want, rtol=0, atol=0)


def test_export_refuses_an_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        hf_config(LlamaConfig(), dtype=torch.int8)


def test_export_replaces_an_existing_folder(tmp_path):
    model = _random_llama(True).float()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.safetensors").write_text("not a checkpoint")
    folder = export_hf(tmp_path / "m", model=model)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "float32"
    assert not list(tmp_path.glob("m.tmp*")) and folder == str(tmp_path / "m")


@torch.inference_mode()
def test_export_of_the_course_model_gives_kvlab_logits(real_model, tmp_path):
    """The real model: transformers on the exported folder computes kvlab's float32 logits, and
    the tokenizer written next to it encodes and templates as kvlab's does."""
    from transformers import AutoTokenizer

    model, tok = real_model
    folder = export_hf(tmp_path / "smollm2", model=model, tokenizer=tok)
    ids = torch.tensor([tok.encode("The key-value cache stores past keys and values")])
    want = model(ids)
    got = _hf_model(folder)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got[0].argmax(-1) == want[0].argmax(-1)).all()
    tok2 = AutoTokenizer.from_pretrained(folder)
    text = "Paged attention, prefix caching and quantized KV."
    assert tok2.encode(text) == tok.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
